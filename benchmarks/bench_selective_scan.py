"""Selective scan: the CPU kernel against selective_scan_ref, measured in the same run.

Default shape: one Mamba-130m-like layer, batch 2, dim 1536, L 512, dstate 16, input-dependent B / C,
with z, D, delta_bias and softplus, fp32. Prints median wall and process-CPU times over --reps runs,
and the effective bandwidth of the fast op: bytes of every input read once and every output written
once, over its wall time.

    PYTHONPATH=. python benchmarks/bench_selective_scan.py [--threads 1] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastdl.ops import causal_conv1d_fn, causal_conv1d_ref, selective_scan_fn, selective_scan_ref


def median_ms(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads), in ms. On a shared machine the wall
    time includes waiting for a core; with one thread the CPU time does not."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ref-reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, d, L, n = args.batch, args.dim, args.seqlen, args.dstate

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        u=torch.randn(b, d, L, generator=g),
        delta=torch.rand(b, d, L, generator=g) * 0.5,
        A=-torch.rand(d, n, generator=g) - 0.1,
        B=torch.randn(b, n, L, generator=g),
        C=torch.randn(b, n, L, generator=g),
        D=torch.randn(d, generator=g),
        z=torch.randn(b, d, L, generator=g),
        delta_bias=torch.rand(d, generator=g) * 0.2 - 0.1,
    )
    names = list(inputs)
    dout = torch.randn(b, d, L, generator=g)

    def forward(fn):
        with torch.no_grad():
            fn(**inputs, delta_softplus=True)

    def forward_backward(fn):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, delta_softplus=True)
        torch.autograd.grad(out, [leaves[k] for k in names], dout)

    elem = 4  # fp32
    # forward: read u, delta, z, B, C; write out and the checkpoints (every 64 steps)
    fwd_bytes = elem * (3 * b * d * L + 2 * b * n * L + b * d * L + b * d * ((L + 63) // 64) * n)
    # backward: read u, delta, z, dout, B, C, checkpoints; write du, ddelta, dz, dB, dC
    bwd_bytes = elem * (4 * b * d * L + 2 * b * n * L + b * d * ((L + 63) // 64) * n  # read
                        + 3 * b * d * L + 2 * b * n * L)  # write

    print(f"selective scan  batch {b}  dim {d}  L {L}  dstate {n}  fp32  threads {args.threads}  "
          f"(median of {args.reps}; ref median of {args.ref_reps})")
    def report(name, fast, ref, nbytes):
        print(f"  {name:<17} wall: fast {fast[0]:7.2f} ms  ref {ref[0]:8.1f} ms"
              f"  speedup {ref[0] / fast[0]:5.1f}x"
              f"  {nbytes / fast[0] / 1e6:5.2f} GB/s  |  cpu: fast {fast[1]:7.2f} ms  ref {ref[1]:8.1f} ms"
              f"  speedup {ref[1] / fast[1]:5.1f}x")

    report("forward", median_ms(lambda: forward(selective_scan_fn), args.reps),
           median_ms(lambda: forward(selective_scan_ref), args.ref_reps), fwd_bytes)
    report("forward+backward", median_ms(lambda: forward_backward(selective_scan_fn), args.reps),
           median_ms(lambda: forward_backward(selective_scan_ref), args.ref_reps), fwd_bytes + bwd_bytes)

    x = torch.randn(b, d, L, generator=g)
    w = torch.randn(d, 4, generator=g)
    bias = torch.randn(d, generator=g)
    conv_fast = median_ms(lambda: causal_conv1d_fn(x, w, bias, activation="silu"), args.reps)[0]
    conv_ref = median_ms(lambda: causal_conv1d_ref(x, w, bias, activation="silu"), args.reps)[0]
    print(f"causal conv1d width 4 silu forward  wall: fast {conv_fast:6.2f} ms"
          f"  ref (F.conv1d) {conv_ref:6.2f} ms"
          f"  {elem * 2 * b * d * L / conv_fast / 1e6:5.2f} GB/s")


if __name__ == "__main__":
    main()
