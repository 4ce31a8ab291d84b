"""LSTM / GRU layers forward and forward+backward and the LSTMCell step, fastdl against torch.nn.

The cases are fastdl.bench.suites.lstm's, the ones ``fastdl bench lstm`` runs:
    pytest benchmarks/bench_lstm.py [--bench-quick] [--bench-device cuda]
"""

BENCH_SUITE = "lstm"


def test_lstm(bench_contender, run_contender) -> None:
    run_contender(bench_contender)
