"""Attention benchmarks: fastdl.flash_attn_func against torch's scaled_dot_product_attention.

The peer is what a user would call instead: SDPA on (batch, heads, seqlen, dim) tensors, which on
CPU dispatches to torch's own flash-attention kernel and on CUDA to FlashAttention-2 or cuDNN.
fastdl takes FlashAttention's (batch, seqlen, heads, dim) layout. Each contender gets its natural,
contiguous layout, so no transpose is timed.

FLOPs follow FlashAttention's benchmarks: 4 * b * s^2 * h * d for the forward (two matmuls), halved
when causal; forward + backward is 3.5x the forward (the backward does 2.5x the forward's matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.core import Case, Contender, StepFn, Suite


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seqlen: int
    headdim: int
    causal: bool
    dtype: torch.dtype = torch.float32

    def forward_flops(self) -> int:
        flops = 4 * self.batch * self.seqlen**2 * self.heads * self.headdim
        return flops // 2 if self.causal else flops

    def io_bytes(self, backward: bool) -> int:
        """q, k, v read and out written (and for the backward dout read, dq, dk, dv written)."""
        tensor = self.batch * self.seqlen * self.heads * self.headdim * torch.empty((), dtype=self.dtype).element_size()
        return tensor * (4 + (4 if backward else 0))

    def label(self) -> str:
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        mask = "causal" if self.causal else "full"
        return f"b{self.batch}-h{self.heads}-s{self.seqlen}-d{self.headdim}-{mask}-{dtype}"


def _inputs(shape: Shape, device: torch.device, layout: str, grad: bool) -> list[torch.Tensor]:
    if layout == "bshd":
        size = (shape.batch, shape.seqlen, shape.heads, shape.headdim)
    else:
        size = (shape.batch, shape.heads, shape.seqlen, shape.headdim)
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(size, generator=generator).to(device=device, dtype=shape.dtype).requires_grad_(grad)
            for _ in range(3)]


def _fastdl(shape: Shape, backward: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        q, k, v = _inputs(shape, device, "bshd", backward)
        if not backward:
            def forward():
                with torch.no_grad():
                    return fastdl.flash_attn_func(q, k, v, causal=shape.causal)
            return forward
        dout = torch.randn_like(q)

        def forward_backward():
            fastdl.flash_attn_func(q, k, v, causal=shape.causal).backward(dout)
        return forward_backward

    return setup


def _sdpa(shape: Shape, backward: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        q, k, v = _inputs(shape, device, "bhsd", backward)
        if not backward:
            def forward():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)
            return forward
        dout = torch.randn_like(q)

        def forward_backward():
            F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal).backward(dout)
        return forward_backward

    return setup


def make_case(shape: Shape, backward: bool) -> Case:
    phase = "fwd+bwd" if backward else "fwd"
    return Case(
        name=f"{phase}-{shape.label()}",
        description=f"flash attention {phase}, {shape.label()}",
        bytes_per_step=shape.io_bytes(backward),
        flops_per_step=int(shape.forward_flops() * (3.5 if backward else 1)),
        contenders=(Contender("fastdl", _fastdl(shape, backward), is_fastdl=True),
                    Contender("torch sdpa", _sdpa(shape, backward))),
        params={"batch": shape.batch, "heads": shape.heads, "seqlen": shape.seqlen, "headdim": shape.headdim,
                "causal": shape.causal, "dtype": str(shape.dtype), "backward": backward},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        if not fastdl.build_info()["cuda"]:
            return []
        seqlens = [512] if quick else [512, 2048, 8192, 16384]
        shapes = [Shape(max(1, 16384 // s) * 2, 2048 // d, s, d, causal, torch.bfloat16)
                  for s in seqlens for d in (64, 128) for causal in (False, True)]
    else:
        # The target: fp32, B=4, H=8, D=64, seqlen 1024, causal; --quick is a quarter of the length.
        seqlen = 256 if quick else 1024
        shapes = [Shape(4, 8, seqlen, 64, causal=True), Shape(4, 8, seqlen, 64, causal=False)]
    return [make_case(shape, backward) for shape in shapes for backward in (False, True)]


SUITE = Suite(name="attention", make_cases=make_cases,
              description="flash attention forward and forward+backward: fastdl vs torch SDPA")
