"""Selective scan and causal conv1d benchmarks: Mamba's two sequence kernels.

- **scan**: fastdl.selective_scan_fn against ``selective_scan_ref``, the pure-PyTorch loop over time that
  is what a CPU user of mamba-ssm has (its fused kernel is CUDA-only), measured in the same run. The shape
  is one mamba-130m layer's: batch 2, dim (d_inner) 1536, L 512, dstate 16, input-dependent B / C
  (batch, dstate, L), with z, D, delta_bias and softplus, as fastdl.nn.Mamba calls it; fp32.
- **conv**: fastdl.causal_conv1d_fn against torch's depthwise ``F.conv1d`` (groups = dim, width - 1 zeros
  of left padding, trimmed) + SiLU: what mamba-ssm's Mamba runs when causal-conv1d is not installed.

Bytes are the minimum traffic (every input read once, every output written once; fastdl's backward
checkpoints are its own business and not counted): the scan forward reads u, delta, z, B, C and writes out,
the backward reads those and dout and writes du, ddelta, dz, dB, dC. The scan is mostly compute-bound on a
CPU (an exp and ~6 FMAs per state element and step: see benchmarks/RESULTS.md's notes), so its GB/s is the
bandwidth it sustains rather than a ceiling it approaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench.core import Case, Contender, StepFn, Suite
from fastdl.ops import causal_conv1d_fn, selective_scan_fn, selective_scan_ref

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    dtype: torch.dtype = torch.float32

    def io_bytes(self, backward: bool) -> int:
        b, d, L, n = self.batch, self.dim, self.seqlen, self.dstate
        elem = torch.empty((), dtype=self.dtype).element_size()
        params = 4 * (d * n + 2 * d)  # A, D, delta_bias (fp32)
        forward = elem * (3 * b * d * L + 2 * b * n * L + b * d * L) + params  # u delta z B C in, out
        if not backward:
            return forward
        # the forward again, then dout u delta z B C in, du ddelta dz dB dC out (and the fp32 parameter grads)
        return forward + elem * (4 * b * d * L + 2 * b * n * L + 3 * b * d * L + 2 * b * n * L) + 2 * params

    def flops(self, backward: bool) -> int:
        """Per state element and step: exp(delta A) (counted 1), delta*B*u (2), h update (2), C.h (2)."""
        forward = 7 * self.batch * self.dim * self.seqlen * self.dstate
        return forward * 3 if backward else forward

    def label(self) -> str:
        return f"b{self.batch}-d{self.dim}-L{self.seqlen}-n{self.dstate}-{_DTYPES[self.dtype]}"


def _scan_inputs(shape: ScanShape, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    """Mamba's value ranges: A < 0 (S4D-real is -1..-dstate), small positive delta before softplus."""
    b, d, L, n = shape.batch, shape.dim, shape.seqlen, shape.dstate
    g = torch.Generator().manual_seed(0)
    act = {"dtype": shape.dtype}
    inputs = {
        "u": (torch.randn(b, d, L, generator=g), act),
        "delta": (torch.rand(b, d, L, generator=g) * 0.5 - 0.25, act),
        "A": (-torch.rand(d, n, generator=g) * n - 0.5, {}),
        "B": (torch.randn(b, n, L, generator=g), act),
        "C": (torch.randn(b, n, L, generator=g), act),
        "D": (torch.randn(d, generator=g), {}),
        "z": (torch.randn(b, d, L, generator=g), act),
        "delta_bias": (torch.rand(d, generator=g) * 0.2 - 4.0, {}),  # softplus(-4) ~ 0.018: dt in Mamba's range
    }
    return {k: v.to(device=device, **kw).requires_grad_(grad) for k, (v, kw) in inputs.items()}


def _scan(fn: Callable, shape: ScanShape, backward: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        x = _scan_inputs(shape, device, backward)
        if not backward:
            def forward():
                with torch.no_grad():
                    return fn(**x, delta_softplus=True)
            return forward
        dout = torch.randn(shape.batch, shape.dim, shape.seqlen, device=device, dtype=shape.dtype)
        leaves = list(x.values())

        def forward_backward():
            return torch.autograd.grad(fn(**x, delta_softplus=True), leaves, dout)
        return forward_backward

    return setup


def make_scan_case(shape: ScanShape, backward: bool, with_ref: bool = True) -> Case:
    phase = "fwd+bwd" if backward else "fwd"
    ref = (Contender("selective_scan_ref", _scan(selective_scan_ref, shape, backward)),) if with_ref else ()
    return Case(
        name=f"scan-{phase}-{shape.label()}",
        description=f"selective scan {phase}, {shape.label()}, input-dependent B/C, z, D, delta_bias, softplus",
        bytes_per_step=shape.io_bytes(backward),
        flops_per_step=shape.flops(backward),
        contenders=(Contender("fastdl", _scan(selective_scan_fn, shape, backward), is_fastdl=True), *ref),
        params={"batch": shape.batch, "dim": shape.dim, "seqlen": shape.seqlen, "dstate": shape.dstate,
                "dtype": str(shape.dtype), "backward": backward, "B/C": "(batch, dstate, L)"},
    )


@dataclass(frozen=True)
class ConvShape:
    batch: int
    dim: int
    seqlen: int
    width: int
    dtype: torch.dtype = torch.float32

    def io_bytes(self, backward: bool) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        act = self.batch * self.dim * self.seqlen
        weights = elem * self.dim * (self.width + 1)
        forward = elem * 2 * act + weights  # x in, out
        return forward + elem * 3 * act + 2 * weights if backward else forward  # dout x in, dx out; dw db

    def label(self) -> str:
        return f"b{self.batch}-d{self.dim}-L{self.seqlen}-w{self.width}-{_DTYPES[self.dtype]}"


def _torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    dim, width = weight.shape
    return F.silu(F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=dim)[..., :x.shape[-1]])


def _fastdl_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return causal_conv1d_fn(x, weight, bias, activation="silu")


def _conv(fn: Callable, shape: ConvShape, backward: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape.batch, shape.dim, shape.seqlen, generator=g)
        weight = torch.randn(shape.dim, shape.width, generator=g) / shape.width**0.5
        bias = torch.randn(shape.dim, generator=g)
        x, weight, bias = (t.to(device=device, dtype=shape.dtype).requires_grad_(backward) for t in (x, weight, bias))
        if not backward:
            def forward():
                with torch.no_grad():
                    return fn(x, weight, bias)
            return forward
        dout = torch.randn_like(x)

        def forward_backward():
            return torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), dout)
        return forward_backward

    return setup


def make_conv_case(shape: ConvShape, backward: bool) -> Case:
    phase = "fwd+bwd" if backward else "fwd"
    return Case(
        name=f"conv-{phase}-{shape.label()}",
        description=f"causal depthwise conv1d + silu {phase}, {shape.label()}",
        bytes_per_step=shape.io_bytes(backward),
        flops_per_step=0,  # 2 * width FLOPs per output: memory-bound
        contenders=(Contender("fastdl", _conv(_fastdl_conv, shape, backward), is_fastdl=True),
                    Contender("torch conv1d", _conv(_torch_conv, shape, backward))),
        params={"batch": shape.batch, "dim": shape.dim, "seqlen": shape.seqlen, "width": shape.width,
                "dtype": str(shape.dtype), "backward": backward},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        if not fastdl.build_info()["cuda"]:
            return []
        # The GPU target: >= 70% of HBM bandwidth for the forward at L >= 2048. The reference loops
        # over L in Python (~10 kernel launches per step), so it gets the 2k shape only.
        seqlens = [2048] if quick else [2048, 4096, 8192]
        scans = [ScanShape(8, 2048, L, 16, dtype) for L in seqlens for dtype in (torch.float32, torch.bfloat16)]
        convs = [ConvShape(8, 2048, L, 4, torch.bfloat16) for L in seqlens]
    else:
        # The CPU target: batch 2, dim 1536, L 512, dstate 16, fp32 (one mamba-130m layer).
        scans = [ScanShape(2, 1536, 128 if quick else 512, 16)]
        convs = [ConvShape(2, 1536, 128 if quick else 2048, 4)]
    return ([make_scan_case(s, backward, with_ref=device.type == "cpu" or s.seqlen <= 2048)
             for s in scans for backward in (False, True)]
            + [make_conv_case(s, backward) for s in convs for backward in (False, True)])


SUITE = Suite(name="scan", make_cases=make_cases,
              description="selective scan vs selective_scan_ref, causal conv1d vs torch conv1d (fwd, fwd+bwd)")
