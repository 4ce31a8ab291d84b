"""fastdl.nn.LSTM / LSTMCell against torch.nn in the same run (CPU, fp32).

    PYTHONPATH=. python benchmarks/bench_rnn.py [--repeats 7] [--batch 32 --seq 128 --input 512 --hidden 512]
    PYTHONPATH=. python benchmarks/bench_rnn.py --threads 1 --clock thread   # CPU time, one thread

Reports the median of `repeats` timed runs (after a warm-up; torch and fastdl calls interleaved) and
GFLOP/s counting the GEMMs only: per step 2 * B * (I + H) * 4H for the LSTM forward (input and
recurrent projections), twice that for the backward (gradients of the inputs and of the weights).
The machine is shared: compare the ratio of two rows measured in the same run, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import fastdl


def interleaved_times(fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter,
                      warmup: int = 1) -> list[list[float]]:
    """Seconds by `clock` of `repeats` calls of each function, interleaved in rotating order so that load from
    other processes on a shared machine falls on every contender alike, after `warmup` calls each
    (allocations, oneDNN primitive creation, brgemm kernel generation)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            start = clock()
            fns[j]()
            times[j].append(clock() - start)
    return times


def median_times(fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
                 ) -> list[float]:
    """Median seconds of each function's interleaved calls (interleaved_times)."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, clock)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--input", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cell-repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: time.perf_counter; thread: time.thread_time, this thread's CPU time (user + "
                             "system), insensitive to being descheduled on a loaded machine; use with --threads 1")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, I, H = args.batch, args.seq, args.input, args.hidden
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    mod = fastdl.nn.LSTM(I, H)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    xg = x.clone().requires_grad_()
    fwd_flops = 2 * B * (I + H) * 4 * H * T

    def forward(m):
        with torch.no_grad():
            return m(x)

    def train_step(m):
        out, _ = m(xg)
        out.sum().backward()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fastdl {fastdl.__version__} "
          f"({fastdl.build_info()['cpu_vec_isa']}), clock {args.clock}")
    print(f"LSTM I={I} H={H} B={B} T={T}, fp32")
    rows = []
    for label, fn, flops in [("forward", forward, fwd_flops), ("forward+backward", train_step, 3 * fwd_flops)]:
        t_ref, t_mod = median_times([lambda: fn(ref), lambda: fn(mod)], args.repeats, clock)  # noqa: B023
        rows.append((label, t_ref, t_mod, flops))

    cell_ref = torch.nn.LSTMCell(I, H)
    cell = fastdl.nn.LSTMCell(I, H)
    cell.load_state_dict(cell_ref.state_dict())
    xc, hc = torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))
    cell_flops = 2 * B * (I + H) * 4 * H
    for label, grad in [("LSTMCell step", True), ("LSTMCell step no_grad", False)]:
        with torch.set_grad_enabled(grad):
            t_ref, t_mod = median_times([lambda: cell_ref(xc, hc), lambda: cell(xc, hc)], args.cell_repeats, clock)
        rows.append((label, t_ref, t_mod, cell_flops))

    print(f"{'case':<24}{'torch ms':>10}{'fastdl ms':>11}{'ratio':>8}{'torch GF/s':>12}{'fastdl GF/s':>13}")
    for label, t_ref, t_mod, flops in rows:
        print(f"{label:<24}{t_ref * 1e3:>10.3f}{t_mod * 1e3:>11.3f}{t_mod / t_ref:>8.2f}"
              f"{flops / t_ref / 1e9:>12.1f}{flops / t_mod / 1e9:>13.1f}")


if __name__ == "__main__":
    main()
