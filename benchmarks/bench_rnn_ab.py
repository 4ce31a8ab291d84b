"""fastdl against torch.nn on the `fastdl bench lstm` shapes, calls interleaved in one process, for A/B runs of two
builds on a shared machine (run it once per build, alternating: `PYTHONPATH=<tree> python benchmarks/bench_rnn_ab.py`).

    PYTHONPATH=. python benchmarks/bench_rnn_ab.py [--threads 2] [--clock wall|thread] [--repeats 15]

Cases: LSTM I=H=512, B=32, T=128 and GRU I=H=256, B=32, T=64, forward (no_grad) and forward + backward
(out.backward(dout)); one LSTMCell step (512, B=32) with and without grad. Prints the median and the minimum
of the interleaved calls: on a loaded machine the minimum is the closer estimate of an idle one, and the
ratio of medians measured in the same process is the figure to compare between builds. `--clock thread` is
this thread's CPU time (use with --threads 1): insensitive to time slices lost to other jobs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from bench_rnn import interleaved_times  # benchmarks/ is on sys.path when run as a script

import fastdl


def interleaved(fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float]
                ) -> tuple[list[float], list[float]]:
    """Median and minimum ms of each function, calls in rotating order after two warm-up calls each."""
    times = interleaved_times(fns, repeats, clock, warmup=2)
    return [statistics.median(t) * 1e3 for t in times], [min(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--repeats", type=int, default=15, help="forward calls per contender (fwd+bwd: half)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    rows = []
    for kind, size, batch, seq in [("lstm", 512, 32, 128), ("gru", 256, 32, 64)]:
        torch.manual_seed(0)
        ref_cls, mod_cls = {"lstm": (torch.nn.LSTM, fastdl.nn.LSTM), "gru": (torch.nn.GRU, fastdl.nn.GRU)}[kind]
        ref, mod = ref_cls(size, size), mod_cls(size, size)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(seq, batch, size)  # (T, B, I)
        xg = x.clone().requires_grad_()
        dout = torch.randn(seq, batch, size)

        def forward(m, x=x):
            with torch.no_grad():
                return m(x)

        def forward_backward(m, xg=xg, dout=dout):
            out, _ = m(xg)
            out.backward(dout)

        for phase, fn, repeats in [("fwd", forward, args.repeats), ("fwd+bwd", forward_backward,
                                                                      max(5, args.repeats // 2))]:
            med, low = interleaved([lambda: fn(ref), lambda: fn(mod)], repeats, clock)  # noqa: B023
            rows.append((f"{phase} {kind}", med, low))
    cell_ref = torch.nn.LSTMCell(512, 512)
    cell = fastdl.nn.LSTMCell(512, 512)
    cell.load_state_dict(cell_ref.state_dict())
    xc, hc = torch.randn(32, 512), (torch.randn(32, 512), torch.randn(32, 512))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            med, low = interleaved([lambda: cell_ref(xc, hc), lambda: cell(xc, hc)], 200, clock)
        rows.append((f"cell {'grad' if grad else 'no_grad'}", med, low))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'case':<14}{'torch ms':>10}{'fastdl ms':>11}{'ratio':>7}{'min torch':>11}{'min fastdl':>12}{'ratio':>7}")
    for name, (t_ref, t_mod), (m_ref, m_mod) in rows:
        print(f"{name:<14}{t_ref:>10.2f}{t_mod:>11.2f}{t_mod / t_ref:>7.2f}{m_ref:>11.2f}{m_mod:>12.2f}"
              f"{m_mod / m_ref:>7.2f}")


if __name__ == "__main__":
    main()
