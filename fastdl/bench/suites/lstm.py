"""Recurrent-layer benchmarks: fastdl.nn.LSTM / GRU / LSTMCell against torch.nn's.

The peer ("torch.nn") is the torch module a user would otherwise call, with the same weights: on CPU torch.nn.LSTM and
GRU run oneDNN's RNN primitives (forward and backward), torch.nn.LSTMCell two MKL GEMMs and torch's fused
cell kernel; on CUDA, cuDNN. Inputs are time-major (seqlen, batch, features), each module's default.

FLOPs count the GEMMs only, the way RNN papers and cuDNN's benchmarks do: per step 2 * B * (I + H) * G * H
for the input and recurrent projections (G gates: LSTM 4, GRU 3); forward + backward is 3x the forward
(the backward's input-gradient and weight-gradient GEMMs are each as large as the forward's). The cell
case is one step of that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import fastdl
from fastdl.bench.core import Case, Contender, StepFn, Suite

_GATES = {"lstm": 4, "gru": 3}
_MODULES = {
    "lstm": (torch.nn.LSTM, fastdl.nn.LSTM),
    "gru": (torch.nn.GRU, fastdl.nn.GRU),
}


@dataclass(frozen=True)
class Shape:
    cell: str  # "lstm" or "gru"
    input_size: int
    hidden: int
    batch: int
    seqlen: int  # 1 for the single-step cell cases
    dtype: torch.dtype = torch.float32

    def forward_flops(self) -> int:
        return 2 * self.batch * (self.input_size + self.hidden) * _GATES[self.cell] * self.hidden * self.seqlen

    def io_bytes(self, backward: bool) -> int:
        """Weights, input sequence and output sequence, read or written once (and for the backward the
        output gradient read, input and weight gradients written)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        weights = _GATES[self.cell] * self.hidden * (self.input_size + self.hidden + 2)
        activations = self.seqlen * self.batch * (self.input_size + self.hidden)
        return size * (weights + activations) * (2 if backward else 1)

    def label(self) -> str:
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.cell}-i{self.input_size}-h{self.hidden}-b{self.batch}-s{self.seqlen}-{dtype}"


def _layer(shape: Shape, fused: bool, backward: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        torch.manual_seed(0)  # both contenders get the same weights and inputs
        module = _MODULES[shape.cell][1 if fused else 0](shape.input_size, shape.hidden)
        module = module.to(device=device, dtype=shape.dtype)
        generator = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(shape.seqlen, shape.batch, shape.input_size, generator=generator)
        x = x.to(device=device, dtype=shape.dtype).requires_grad_(backward)
        if not backward:
            def forward():
                with torch.no_grad():
                    return module(x)
            return forward
        dout = torch.randn(shape.seqlen, shape.batch, shape.hidden, generator=generator).to(device, shape.dtype)

        def forward_backward():
            out, _ = module(x)
            out.backward(dout)
        return forward_backward

    return setup


def _cell(shape: Shape, fused: bool, grad: bool) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        torch.manual_seed(0)
        cls = fastdl.nn.LSTMCell if fused else torch.nn.LSTMCell
        cell = cls(shape.input_size, shape.hidden).to(device=device, dtype=shape.dtype)
        generator = torch.Generator(device="cpu").manual_seed(1)
        x, h, c = (torch.randn(shape.batch, n, generator=generator).to(device, shape.dtype)
                   for n in (shape.input_size, shape.hidden, shape.hidden))

        def step():
            with torch.set_grad_enabled(grad):
                return cell(x, (h, c))
        return step

    return setup


def layer_case(shape: Shape, backward: bool) -> Case:
    phase = "fwd+bwd" if backward else "fwd"
    return Case(
        name=f"{phase}-{shape.label()}",
        description=f"{shape.cell.upper()} layer {phase}, {shape.label()}",
        bytes_per_step=shape.io_bytes(backward),
        flops_per_step=shape.forward_flops() * (3 if backward else 1),
        contenders=(Contender("fastdl", _layer(shape, True, backward), is_fastdl=True),
                    Contender("torch.nn", _layer(shape, False, backward))),
        params={"cell": shape.cell, "input_size": shape.input_size, "hidden": shape.hidden, "batch": shape.batch,
                "seqlen": shape.seqlen, "dtype": str(shape.dtype), "backward": backward},
    )


def cell_case(shape: Shape, grad: bool) -> Case:
    mode = "grad" if grad else "no_grad"
    return Case(
        name=f"cell-{mode}-{shape.label()}",
        description=f"one LSTMCell step ({mode}), {shape.label()}",
        bytes_per_step=shape.io_bytes(False),
        flops_per_step=shape.forward_flops(),
        contenders=(Contender("fastdl", _cell(shape, True, grad), is_fastdl=True),
                    Contender("torch.nn", _cell(shape, False, grad))),
        params={"cell": "lstm", "input_size": shape.input_size, "hidden": shape.hidden, "batch": shape.batch,
                "dtype": str(shape.dtype), "grad": grad},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        if not fastdl.build_info()["cuda"]:
            return []
        # The GPU target: hidden 1024 against cuDNN, small batches (persistence) and batch 64.
        batches = [8] if quick else [4, 8, 64]
        layers = [Shape("lstm", 1024, 1024, b, 64 if quick else 256) for b in batches]
        cells = [Shape("lstm", 1024, 1024, 64, 1)]
    elif quick:
        layers = [Shape("lstm", 128, 128, 8, 16), Shape("gru", 64, 64, 8, 16)]
        cells = [Shape("lstm", 128, 128, 8, 1)]
    else:
        # The CPU target: fp32 LSTM, input 512, hidden 512, batch 32, seq 128; and a smaller GRU.
        layers = [Shape("lstm", 512, 512, 32, 128), Shape("gru", 256, 256, 32, 64)]
        cells = [Shape("lstm", 512, 512, 32, 1)]
    cases = [layer_case(shape, backward) for shape in layers for backward in (False, True)]
    cases += [cell_case(shape, grad) for shape in cells for grad in (False, True)]
    return cases


SUITE = Suite(name="lstm", make_cases=make_cases,
              description="LSTM / GRU layers forward and forward+backward, LSTMCell step: fastdl vs torch.nn")
