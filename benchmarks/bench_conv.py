"""Fused conv + BN + ReLU (eval) on ResNet stage shapes and ResNet-50 inference, fastdl against eager torch
and torch's conv-BN folding.

The cases are fastdl.bench.suites.conv's, the ones ``fastdl bench conv`` runs:
    pytest benchmarks/bench_conv.py [--bench-quick] [--bench-device cuda]
"""

BENCH_SUITE = "conv"


def test_conv(bench_contender, run_contender) -> None:
    run_contender(bench_contender)
