"""Per-op timings of fastdl's fused RMSNorm, rotary embedding and SwiGLU kernels against torch's composites
(``torch.nn.functional.rms_norm``, RoPE as torch pointwise ops + cat, ``F.silu(gate) * up``), on the
activation shapes of one gpt-chars training step.

    python benchmarks/bench_fused_layers.py [--reps 30] [--threads 1] [--dtype float32]

Forward, and forward + backward (autograd, a fixed upstream gradient), timed with the thread's CPU time
(``time.thread_time``) so that a shared machine's waiting is left out; fastdl and torch alternate call by call.
GB/s counts the bytes an ideal fused kernel moves: its inputs read once and outputs written once
(RMSNorm 2 N forward, 5 N with backward; RoPE 2 N / 4 N; SwiGLU 3 N / 8 N elements).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fastdl.bench.suites.train import TrainShape
from fastdl.ops.fused_layers import rms_norm, rotary_emb, rotary_emb_ref, swiglu


def cases(dtype: torch.dtype):
    shape = TrainShape.gpt_chars()
    cfg = shape.config()
    rows = shape.batch * shape.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.n_embd, generator=g).to(dtype)
    w = torch.ones(cfg.n_embd, dtype=dtype)
    heads = cfg.n_head + 2 * cfg.n_kv_head
    qkv = torch.randn(shape.batch, shape.block_size, heads, cfg.head_dim, generator=g).to(dtype)
    q = qkv[:, :, : cfg.n_head]  # the strided view Attention passes
    angles = torch.rand(shape.block_size, cfg.head_dim // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    gate = torch.randn(rows, cfg.ffn_hidden, generator=g).to(dtype)
    up = torch.randn(rows, cfg.ffn_hidden, generator=g).to(dtype)
    ns = [cfg.n_embd]
    return [
        (f"rms_norm ({rows}, {cfg.n_embd})", x.numel(), (2, 5), [x, w],
         lambda x, w: rms_norm(x, ns, w, 1e-5), lambda x, w: F.rms_norm(x, ns, w, 1e-5)),
        (f"rotary_emb q view {tuple(q.shape)}", q.numel(), (2, 4), [q],
         lambda q: rotary_emb(q, cos, sin), lambda q: rotary_emb_ref(q, cos, sin)),
        (f"swiglu ({rows}, {cfg.ffn_hidden})", gate.numel(), (3, 8), [gate, up],
         swiglu, lambda g, u: F.silu(g) * u),
    ]


def timed(fn) -> float:
    begin = time.thread_time()
    fn()
    return time.thread_time() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    print(f"{args.dtype}, threads {torch.get_num_threads()}, thread CPU time, median of {args.reps}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| op | pass | fastdl ms | torch ms | fastdl GB/s | torch GB/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, n, (fwd_bytes, both_bytes), inputs, fast, composite in cases(dtype):
        for label, nbytes, backward in (("fwd", fwd_bytes, False), ("fwd+bwd", both_bytes, True)):
            def make(fn, inputs=inputs, backward=backward):
                leaves = [t.detach().requires_grad_(backward) for t in inputs]
                grad = torch.randn(fn(*leaves).shape).to(dtype) if backward else None

                def call(fn=fn, leaves=leaves, grad=grad, backward=backward):
                    out = fn(*leaves)
                    if backward:
                        torch.autograd.backward(out, grad)
                        for t in leaves:
                            t.grad = None
                return call

            calls = {"fastdl": make(fast), "torch": make(composite)}
            samples = {k: [] for k in calls}
            for _ in range(3):
                for c in calls.values():
                    c()
            for _ in range(args.reps):
                for k, c in calls.items():
                    samples[k].append(timed(c))
            ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            gbs = {k: nbytes * n * elem / (v * 1e-3) / 1e9 for k, v in ms.items()}
            print(f"| {name} | {label} | {ms['fastdl']:.3f} | {ms['torch']:.3f} | {gbs['fastdl']:.1f} | "
                  f"{gbs['torch']:.1f} | {ms['torch'] / ms['fastdl']:.2f}x |")


if __name__ == "__main__":
    main()
