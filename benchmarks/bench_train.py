"""Training throughput of the gpt-chars model: fastdl's fused ops against the same model in plain torch,
with tokens/s and model FLOPs utilisation against this machine's measured matmul peak.

    python benchmarks/bench_train.py [--steps 20] [--threads N] [--cpu-time] [--quick]

The two contenders are fastdl.bench.suites.train's (``fastdl bench train`` runs the same case); here their
steps are interleaved (A, B, A, B, ...) so that a shared machine's load hits both alike, and the peak is a
large fp32 matmul timed in the same process. ``--cpu-time`` times with the process's CPU time instead of the
wall clock: with ``--threads 1`` on a machine shared with other jobs, that leaves out the time the process
waits for a core, which the wall clock does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastdl.bench.suites.train import TrainShape, make_step


class MatmulPeak:
    """FLOP/s of an n x n x n fp32 torch.mm, the ceiling MFU is measured against. Timed once per round of
    the benchmark and the best kept: on a shared machine the best is the closest to what the cores can do."""

    def __init__(self, n: int = 2048) -> None:
        self.n = n
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        self.best_seconds = float("inf")
        self.sample()

    def sample(self) -> None:
        self.best_seconds = min(self.best_seconds, _timed(lambda: torch.mm(self.a, self.b, out=self.out)))

    def flops(self) -> float:
        return 2 * self.n**3 / self.best_seconds


CLOCK = time.perf_counter


def _timed(fn) -> float:
    begin = CLOCK()
    fn()
    return CLOCK() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time (use with --threads 1)")
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = TrainShape.gpt_chars()
    if args.quick:
        shape = TrainShape(4, 64, 2, shape.n_embd, shape.n_head, shape.n_kv_head)
    tokens = shape.batch * shape.block_size
    flops = shape.flops_per_step()
    device = torch.device("cpu")
    steps = {"fastdl": make_step(shape, device, fused_ops=True), "torch": make_step(shape, device, fused_ops=False)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(2):  # warm-up beyond make_step's first step
        for fn in steps.values():
            fn()
    peak_meter = MatmulPeak()
    for _ in range(args.steps):
        for name, fn in steps.items():
            times[name].append(_timed(fn))
        peak_meter.sample()
    peak = peak_meter.flops()

    print(f"gpt-chars step {shape.label()}, {tokens} tokens, {flops / 1e9:.2f} GFLOP per step; "
          f"threads {torch.get_num_threads()}, {'CPU time' if args.cpu_time else 'wall clock'}, "
          f"load {os.getloadavg()[0]:.1f}, matmul peak {peak / 1e9:.0f} GFLOP/s")
    print("| contender | median step ms | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {flops / seconds / 1e9:.1f} | "
              f"{100 * flops / seconds / peak:.1f}% |")
    print(f"fastdl tokens/s over torch's: {median['torch'] / median['fastdl']:.2f}x")


if __name__ == "__main__":
    main()
