"""Selective scan (vs selective_scan_ref) and causal conv1d (vs torch's depthwise conv1d), forward and
forward+backward.

The cases are fastdl.bench.suites.scan's, the ones ``fastdl bench scan`` runs:
    pytest benchmarks/bench_scan.py [--bench-quick] [--bench-device cuda]
"""

BENCH_SUITE = "scan"


def test_scan(bench_contender, run_contender) -> None:
    run_contender(bench_contender)
