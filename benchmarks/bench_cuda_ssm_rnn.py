"""GPU figures for the CUDA selective scan, causal conv1d and LSTM layer, each against its peer in the same run.

* selective scan forward (and forward + backward) at batch 2, dim 1536, dstate 16, input-dependent B / C, with
  z, D, delta_bias and softplus: effective GB/s (every input read once, every output written once) against
  the measured device copy bandwidth, and the speedup over selective_scan_ref;
* causal conv1d forward + silu at the same shape, width 4: GB/s;
* LSTM, input and hidden 1024, seq 128, batch 4 / 8 / 64: forward and forward + backward against torch.nn.LSTM
  (cuDNN) with the same weights.

Timing: CUDA events around each call, median of --reps after --warmup calls.

    PYTHONPATH=. python benchmarks/bench_cuda_ssm_rnn.py [--reps 20] [--seqlens 2048 4096]
    PYTHONPATH=. python benchmarks/bench_cuda_ssm_rnn.py --device cpu --quick   # smoke test of this script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdl
from fastdl.ops import causal_conv1d_fn, selective_scan_fn, selective_scan_ref


def timer(device: torch.device, reps: int, warmup: int):
    def measure(fn) -> float:
        """Median milliseconds of fn()."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def copy_bandwidth(device: torch.device, measure) -> float:
    """GB/s of a device-to-device copy of 256 MB (read + write counted)."""
    n = 1 << 26 if device.type == "cuda" else 1 << 22
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * n * 4 / ms / 1e6


def bench_scan(device, measure, seqlens, batch, dim, dstate, ref_reps):
    print(f"\nselective scan  batch {batch}  dim {dim}  dstate {dstate}  fp32, input-dependent B/C, z, D, softplus")
    print(f"{'L':>6} {'fwd ms':>9} {'fwd GB/s':>9} {'ref ms':>9} {'x ref':>7} {'f+b ms':>9} {'f+b GB/s':>9}")
    def one(L):
        g = torch.Generator(device=device).manual_seed(0)
        inputs = dict(
            u=torch.randn(batch, dim, L, device=device, generator=g),
            delta=torch.rand(batch, dim, L, device=device, generator=g) * 0.5,
            A=-torch.rand(dim, dstate, device=device, generator=g) - 0.1,
            B=torch.randn(batch, dstate, L, device=device, generator=g),
            C=torch.randn(batch, dstate, L, device=device, generator=g),
            D=torch.randn(dim, device=device, generator=g),
            z=torch.randn(batch, dim, L, device=device, generator=g),
            delta_bias=torch.rand(dim, device=device, generator=g) * 0.2 - 0.1,
        )
        dout = torch.randn(batch, dim, L, device=device, generator=g)

        def forward(fn=selective_scan_fn):
            with torch.no_grad():
                fn(**inputs, delta_softplus=True)

        def forward_backward():
            leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
            out = selective_scan_fn(**leaves, delta_softplus=True)
            torch.autograd.grad(out, list(leaves.values()), dout)

        ckpt = batch * dim * ((L + 63) // 64) * dstate
        fwd_bytes = 4 * (4 * batch * dim * L + 2 * batch * dstate * L + ckpt)  # u, delta, z, out; B, C; checkpoints
        bwd_bytes = 4 * (7 * batch * dim * L + 4 * batch * dstate * L + ckpt)  # + dout, du, ddelta, dz; dB, dC
        fwd = measure(forward)
        ref = timer(device, ref_reps, 1)(lambda: forward(selective_scan_ref))
        fb = measure(forward_backward)
        print(f"{L:>6} {fwd:>9.3f} {fwd_bytes / fwd / 1e6:>9.1f} {ref:>9.2f} {ref / fwd:>7.1f} {fb:>9.3f} "
              f"{(fwd_bytes + bwd_bytes) / fb / 1e6:>9.1f}")

    for L in seqlens:
        one(L)


def bench_conv(device, measure, seqlens, batch, dim):
    print(f"\ncausal conv1d  batch {batch}  dim {dim}  width 4  fp32  silu")
    print(f"{'L':>6} {'fwd ms':>9} {'fwd GB/s':>9}")
    def one(L):
        x = torch.randn(batch, dim, L, device=device)
        w, b = torch.randn(dim, 4, device=device), torch.randn(dim, device=device)
        ms = measure(lambda: causal_conv1d_fn(x, w, b, activation="silu"))
        print(f"{L:>6} {ms:>9.3f} {2 * 4 * batch * dim * L / ms / 1e6:>9.1f}")

    for L in seqlens:
        one(L)


def bench_lstm(device, measure, hidden, seq, batches):
    print(f"\nLSTM  input {hidden}  hidden {hidden}  seq {seq}  fp32 (TF32 off for both)")
    print(f"{'batch':>6} {'fwd ms':>9} {'peer ms':>9} {'ratio':>7} {'f+b ms':>9} {'peer ms':>9} {'ratio':>7} "
          f"{'GFLOP/s':>8}")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    def one(batch):
        peer = torch.nn.LSTM(hidden, hidden).to(device)
        mod = fastdl.nn.LSTM(hidden, hidden).to(device)
        mod.load_state_dict(peer.state_dict())
        x = torch.randn(seq, batch, hidden, device=device)

        def fwd(m):
            with torch.no_grad():
                m(x)

        def fwd_bwd(m):
            xi = x.detach().requires_grad_()
            out, (h, c) = m(xi)
            torch.autograd.grad(out.sum(), [xi, *m.parameters()])

        f, fp = measure(lambda: fwd(mod)), measure(lambda: fwd(peer))
        fb, fbp = measure(lambda: fwd_bwd(mod)), measure(lambda: fwd_bwd(peer))
        flops = 2 * seq * batch * 4 * hidden * (2 * hidden)  # both GEMMs of every step
        print(f"{batch:>6} {f:>9.3f} {fp:>9.3f} {f / fp:>7.2f} {fb:>9.3f} {fbp:>9.3f} {fb / fbp:>7.2f} "
              f"{flops / f / 1e6:>8.0f}")


    for batch in batches:
        one(batch)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script runs")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.reps, args.warmup, args.seqlens = 2, 1, [128]
    measure = timer(device, args.reps, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}  torch {torch.__version__}  fastdl {fastdl.__version__}  "
          f"copy bandwidth {copy_bandwidth(device, measure):.0f} GB/s")
    dim = 64 if args.quick else 1536
    bench_scan(device, measure, args.seqlens, 2, dim, 16, 1 if args.quick else 3)
    bench_conv(device, measure, args.seqlens, 2, dim)
    bench_lstm(device, measure, 64 if args.quick else 1024, 8 if args.quick else 128, [4, 8, 64])


if __name__ == "__main__":
    main()
