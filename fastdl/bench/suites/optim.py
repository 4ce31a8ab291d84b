"""Optimizer step benchmarks: fastdl.optim against torch.optim's three implementations.

Each case is one ``optimizer.step()`` over a parameter list with fixed random gradients, after a few
steps so that the optimizer state exists. The peers are torch.optim with ``foreach=False`` (a Python
loop over tensors), ``foreach=True`` (multi-tensor ops, one pass per math op) and ``fused=True`` (one
kernel per tensor); fastdl.optim is the same class name with the same arguments.

The target is AdamW on 10M fp32 parameters, as few large tensors (50 x 200k: bandwidth-bound) and as
many small ones (1,000 x 10k: per-tensor overhead shows). The bf16, Adam and SGD cases cost a few
seconds more and catch a regression in the other code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import fastdl.optim
from fastdl.bench.core import Case, Contender, StepFn, Suite

STATE_WARMUP_STEPS = 3  # steps before timing, so that every state tensor exists and is touched
TORCH_VARIANTS = (("torch foreach=False", {"foreach": False}),
                  ("torch foreach=True", {"foreach": True}),
                  ("torch fused=True", {"fused": True}))
DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Rule:
    """An update rule as torch.optim and fastdl.optim both name it."""

    name: str  # used in case names
    class_name: str  # the class in torch.optim and fastdl.optim
    hyperparams: dict = field(default_factory=dict)
    state_tensors: int = 2  # per-parameter state tensors of the parameter's dtype (torch's zeros_like)


ADAMW = Rule("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2})
ADAM = Rule("adam", "Adam", {"lr": 1e-3})
SGD_MOMENTUM = Rule("sgd-momentum", "SGD", {"lr": 1e-2, "momentum": 0.9}, state_tensors=1)


@dataclass(frozen=True)
class Workload:
    rule: Rule
    num_tensors: int
    numel: int  # per tensor
    dtype: torch.dtype = torch.float32

    def bytes_per_step(self) -> int:
        """Read and write the param and each state tensor, read the grad: AdamW fp32 is 7 x 4 = 28 bytes
        per param, bf16 params with bf16 state 14, SGD with momentum fp32 20."""
        element_bytes = torch.empty((), dtype=self.dtype).element_size()
        per_param = element_bytes * (2 + 1 + 2 * self.rule.state_tensors)
        return per_param * self.num_tensors * self.numel

    def case_name(self) -> str:
        return f"{self.rule.name}-{DTYPE_LABELS[self.dtype]}-{self.num_tensors}x{_count(self.numel)}"

    def description(self) -> str:
        total = self.num_tensors * self.numel
        return (f"{self.rule.class_name}, {_count(total)} {DTYPE_LABELS[self.dtype]} params as "
                f"{self.num_tensors} tensors of {_count(self.numel)}")


def _count(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def _parameters(workload: Workload, device: torch.device) -> list[torch.Tensor]:
    """The same values for every contender (seeded); grads are fixed random tensors set once."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(workload.num_tensors):
        param = torch.randn(workload.numel, generator=generator).to(device=device, dtype=workload.dtype)
        param.grad = torch.randn(workload.numel, generator=generator).to(device=device, dtype=workload.dtype)
        params.append(param)
    return params


OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _fastdl_optimizer(rule: Rule) -> OptimizerFactory:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        # Looked up at setup, not import, so the other contenders still run while a class is missing.
        optimizer_class = getattr(fastdl.optim, rule.class_name, None)
        if optimizer_class is None:
            raise NotImplementedError(f"fastdl.optim.{rule.class_name} does not exist")
        return optimizer_class(params, **rule.hyperparams)

    return make


def _torch_optimizer(rule: Rule, options: dict) -> OptimizerFactory:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return getattr(torch.optim, rule.class_name)(params, **rule.hyperparams, **options)

    return make


def _setup(workload: Workload, make_optimizer: OptimizerFactory) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        optimizer = make_optimizer(_parameters(workload, device))
        for _ in range(STATE_WARMUP_STEPS):
            optimizer.step()
        return optimizer.step

    return setup


def make_case(workload: Workload) -> Case:
    rule = workload.rule
    contenders = [Contender("fastdl", _setup(workload, _fastdl_optimizer(rule)), is_fastdl=True)]
    contenders += [Contender(label, _setup(workload, _torch_optimizer(rule, options)))
                   for label, options in TORCH_VARIANTS]
    return Case(
        name=workload.case_name(),
        description=workload.description(),
        bytes_per_step=workload.bytes_per_step(),
        contenders=tuple(contenders),
        params={"rule": rule.class_name, "hyperparams": rule.hyperparams, "num_tensors": workload.num_tensors,
                "numel_per_tensor": workload.numel, "dtype": str(workload.dtype)},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    # quick keeps the tensor sizes and takes a tenth of the tensors: 1M params, a few ms per step.
    scale = 10 if quick else 1
    workloads = [
        Workload(ADAMW, 50 // scale, 200_000),
        Workload(ADAMW, 1000 // scale, 10_000),
        Workload(ADAMW, 50 // scale, 200_000, torch.bfloat16),
        Workload(ADAM, 50 // scale, 200_000),
        Workload(SGD_MOMENTUM, 50 // scale, 200_000),
    ]
    return [make_case(workload) for workload in workloads]


SUITE = Suite(name="optim", make_cases=make_cases,
              description="one optimizer step: fastdl.optim vs torch.optim (for-loop, foreach, fused)")
