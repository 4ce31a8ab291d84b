"""Flash attention forward and forward+backward, fastdl against torch SDPA.

The cases are fastdl.bench.suites.attention's, the ones ``fastdl bench attention`` runs:
    pytest benchmarks/bench_attention.py [--bench-quick] [--bench-device cuda]
"""

BENCH_SUITE = "attention"


def test_attention(bench_contender, run_contender) -> None:
    run_contender(bench_contender)
