"""fastdl.flash_attn_func against torch's SDPA (its CPU flash-attention kernel), measured in the same run.

    PYTHONPATH=. python benchmarks/bench_flash_attn.py [--batch 4 --nheads 8 --seqlen 1024 --headdim 64]

Both run on the same data: fastdl on (batch, seqlen, nheads, headdim), SDPA on (batch, nheads, seqlen,
headdim) contiguous copies. The two are timed alternately, each sample one call, and the median is
reported, so that load from other processes on a shared machine hits both alike. FLOPs follow
FlashAttention's count: forward 4 * batch * seqlen^2 * nheads * headdim, halved when causal; forward +
backward 3.5x the forward (two GEMMs forward, five backward, one recomputed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastdl


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    b, s, h, d = args.batch, args.seqlen, args.nheads, args.headdim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(3))  # (b, s, h, d)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (b, h, s, d) for SDPA
    dout = torch.randn(b, s, h, d, generator=g).to(dtype)
    dout_t = dout.transpose(1, 2).contiguous()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves_t = [x.clone().requires_grad_() for x in (qt, kt, vt)]

    def fastdl_fwd():
        with torch.no_grad():
            fastdl.flash_attn_func(q, k, v, causal=args.causal)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal)

    def fastdl_fwd_bwd():
        out = fastdl.flash_attn_func(*leaves, causal=args.causal)
        torch.autograd.grad(out, leaves, dout)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(*leaves_t, is_causal=args.causal)
        torch.autograd.grad(out, leaves_t, dout_t)

    flops = 4 * b * s * s * h * d / (2 if args.causal else 1)
    print(f"{args.dtype} batch={b} nheads={h} seqlen={s} headdim={d} causal={args.causal} "
          f"threads={torch.get_num_threads()} isa={fastdl.build_info()['cpu_vec_isa']}")
    runs = [("forward", {"fastdl": fastdl_fwd, "sdpa": sdpa_fwd}, flops),
            ("forward+backward", {"fastdl": fastdl_fwd_bwd, "sdpa": sdpa_fwd_bwd}, 3.5 * flops)]
    for label, fns, work in runs:
        t = compare(fns, args.repeats)
        print(f"{label:>17}: fastdl {t['fastdl'] * 1e3:7.1f} ms {work / t['fastdl'] / 1e9:6.1f} GFLOP/s | "
              f"sdpa {t['sdpa'] * 1e3:7.1f} ms {work / t['sdpa'] / 1e9:6.1f} GFLOP/s | "
              f"fastdl/sdpa {t['fastdl'] / t['sdpa']:.2f}x")


if __name__ == "__main__":
    main()
