"""One optimizer step, fastdl.optim against torch.optim for-loop / foreach / fused.

The cases are fastdl.bench.suites.optim's, the ones ``fastdl bench optim`` runs:
    pytest benchmarks/bench_optim.py [--bench-quick] [--bench-device cuda]
"""

BENCH_SUITE = "optim"


def test_optim_step(bench_contender, run_contender) -> None:
    run_contender(bench_contender)
