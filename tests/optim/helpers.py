"""Problem builders and runners shared by the optimizer tests.

A problem is four parameters of odd sizes in two param groups (the second with half the learning
rate), one of them a transposed, non-contiguous view, plus a fixed sequence of fresh random
gradients, one per step. Every optimizer under comparison sees the same initial values and the same
gradients, so differences in the parameters come from the update rule alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import fastdl.optim

# (7,) and (13, 5) are not multiples of any SIMD width (8 or 16 floats), so every kernel runs its
# vector body and its masked tail; (5, 9) is built as a transposed (9, 5) tensor: strides (1, 5).
SHAPES: tuple[tuple[int, ...], ...] = ((7,), (13, 5), (3, 4, 5), (5, 9))
TRANSPOSED = 3

# The second param group runs at this fraction of the first group's lr, so that a kernel that read
# one group's hyperparameters for another would show.
GROUP1_LR_SCALE = 0.5

# fp32 comparisons against torch: 1e-6 relative, as the issue asks. Parameters start as N(0, 1), so
# their scale is 1 and an atol of 1e-6 is that same 1e-6 measured against the tensor's scale; it only
# matters for the few elements that a random walk leaves near 0, where a 1-ulp difference in an
# intermediate (fp32 ulp at 1 is 1.2e-7) is a large *relative* error but not a wrong update.
# Bit-exactness is not possible: torch's CPU sqrt goes through MKL VML, which is not correctly
# rounded (1 ulp off for ~20% of inputs). SGD and Adamax, which take no square root, do agree bit for
# bit; for the others, 200 steps on 4 seeds differ by at most 1.4e-6 absolute (RMSprop centered with
# momentum 0.9, which sums ~10 steps' differences), about half of what this tolerance allows there.
FP32_TOL = dict(rtol=1e-6, atol=1e-6)


def make_params(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[Tensor]:
    """Fresh N(0, 1) parameters of SHAPES, the last one non-contiguous."""
    params = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    rows, cols = SHAPES[TRANSPOSED]
    params[TRANSPOSED] = torch.randn(cols, rows, device=device).to(dtype).t()
    return params


def make_grads(steps: int, device: str | torch.device = "cpu") -> list[list[Tensor]]:
    """One list of fresh N(0, 1) fp32 gradients per step. All are contiguous, also the transposed
    parameter's: a gradient need not share its parameter's strides, and the optimizer must cope."""
    return [[torch.randn(s, device=device) for s in SHAPES] for _ in range(steps)]


def clone_params(params: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Leaf copies that keep each tensor's strides (clone preserves the layout of dense tensors)."""
    return [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in params]


def param_groups(params: Sequence[Tensor], lr: float) -> list[dict[str, Any]]:
    return [{"params": list(params[:2])}, {"params": list(params[2:]), "lr": lr * GROUP1_LR_SCALE}]


def run(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Sequence[Tensor]]) -> None:
    """Steps `optimizer` once per gradient list; gradients are cast to each parameter's dtype."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        optimizer.step()


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: fastdl's class, torch's class and their shared kwargs."""

    name: str
    fast: Callable[..., torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        return self.kwargs["lr"]

    def make_fast(self, params: Sequence[Tensor], **extra: Any) -> torch.optim.Optimizer:
        return self.fast(param_groups(params, self.lr), **self.kwargs, **extra)

    def make_torch(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        # foreach=False: torch's single-tensor implementation, the reference the kernels follow.
        # (LAMB's reference, fastdl.optim.LAMBReference, is single-tensor and has no such argument.)
        extra = {"foreach": False} if issubclass(self.torch_cls, TORCH_CLASSES) else {}
        return self.torch_cls(param_groups(params, self.lr), **self.kwargs, **extra)


F = fastdl.optim
T = torch.optim
TORCH_CLASSES = (T.SGD, T.Adagrad, T.RMSprop, T.Adam, T.AdamW, T.Adamax, T.NAdam)

# Every flag of every optimizer appears on and off at least once. Learning rates are large enough
# that 200 steps move the parameters well away from their start (lr 1e-2 x 200 steps ~ the N(0, 1)
# scale for the adaptive rules); weight decays are large enough to matter over 200 steps.
CASES: list[Case] = [
    Case("SGD-plain", F.SGD, T.SGD, dict(lr=0.01)),
    Case("SGD-momentum-wd", F.SGD, T.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.05)),
    Case(
        "SGD-momentum-dampening-maximize",
        F.SGD,
        T.SGD,
        dict(lr=0.01, momentum=0.8, dampening=0.3, maximize=True),
    ),
    Case("SGD-nesterov-wd", F.SGD, T.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05)),
    Case("Adagrad-default", F.Adagrad, T.Adagrad, dict(lr=0.05)),
    Case(
        "Adagrad-lr_decay-wd-init_acc",
        F.Adagrad,
        T.Adagrad,
        dict(lr=0.05, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.5),
    ),
    Case("Adagrad-maximize-eps", F.Adagrad, T.Adagrad, dict(lr=0.05, maximize=True, eps=1e-6)),
    Case("RMSprop-default", F.RMSprop, T.RMSprop, dict(lr=0.01)),
    Case("RMSprop-centered-momentum", F.RMSprop, T.RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    Case(
        "RMSprop-centered-wd-maximize",
        F.RMSprop,
        T.RMSprop,
        dict(lr=0.01, centered=True, weight_decay=0.05, maximize=True, alpha=0.9),
    ),
    Case("RMSprop-momentum-eps", F.RMSprop, T.RMSprop, dict(lr=0.01, momentum=0.5, eps=1e-4)),
    Case("Adam-default", F.Adam, T.Adam, dict(lr=0.01)),
    Case("Adam-amsgrad-wd", F.Adam, T.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    Case("Adam-maximize-betas", F.Adam, T.Adam, dict(lr=0.01, maximize=True, betas=(0.8, 0.99))),
    Case("Adam-decoupled_wd", F.Adam, T.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    Case("AdamW-default", F.AdamW, T.AdamW, dict(lr=0.01)),
    Case(
        "AdamW-amsgrad-maximize",
        F.AdamW,
        T.AdamW,
        dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
    ),
    Case("Adamax-default", F.Adamax, T.Adamax, dict(lr=0.01)),
    Case(
        "Adamax-wd-maximize-betas",
        F.Adamax,
        T.Adamax,
        dict(lr=0.01, weight_decay=0.05, maximize=True, betas=(0.7, 0.99)),
    ),
    Case("NAdam-default", F.NAdam, T.NAdam, dict(lr=0.01)),
    Case("NAdam-wd-momentum_decay", F.NAdam, T.NAdam, dict(lr=0.01, weight_decay=0.05, momentum_decay=0.01)),
    Case(
        "NAdam-decoupled_wd-maximize",
        F.NAdam,
        T.NAdam,
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
]

# One configuration per optimizer class (its last in CASES, with several flags on), for the tests
# that check plumbing (state dicts, schedulers, AMP) rather than the arithmetic.
ONE_PER_CLASS: list[Case] = [
    next(c for c in reversed(CASES) if c.name.startswith(prefix + "-"))
    for prefix in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam")
]


# Every fastdl class once, LAMB (against its reference) included.
ALL_CLASSES: list[Case] = ONE_PER_CLASS + [
    Case("LAMB-wd-maximize", F.LAMB, F.LAMBReference, dict(lr=0.01, weight_decay=0.1, maximize=True)),
]


def case_ids(cases: Sequence[Case]) -> list[str]:
    return [c.name for c in cases]


def max_abs_err(params: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """max |p - ref| over every element of every tensor, in fp32; NaN if any element is NaN."""
    errs = [(p.detach().float() - r.detach().float()).abs().max() for p, r in zip(params, reference)]
    return torch.stack(errs).max().item()


def snapshot(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[str, Any]:
    """Deep copy of the parameters and of every tensor and number in the optimizer's state."""
    state = {}
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            state[(i, k)] = v.detach().clone() if isinstance(v, Tensor) else v
    return {"params": [p.detach().clone() for p in params], "state": state}


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bitwise equality (NaN-aware) of two snapshots, keys included."""
    assert before["state"].keys() == after["state"].keys()
    for a, b in zip(before["params"], after["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for key, v in before["state"].items():
        w = after["state"][key]
        if isinstance(v, Tensor):
            torch.testing.assert_close(v, w, rtol=0, atol=0, equal_nan=True, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert v == w, key


# ---- direct calls of the ops: torch.ops.fastdl.fused_<rule>_ ----------------------------------------

# The hyperparameters of each op (schemas in csrc/ops.cpp), at ordinary values.
OP_HYPER: dict[str, dict[str, Any]] = {
    "fused_sgd_": dict(
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=0.01,
        nesterov=True,
        maximize=False,
        is_first_step=False,
    ),
    "fused_adagrad_": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False),
    "fused_rmsprop_": dict(
        lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.9, centered=True, maximize=False
    ),
    "fused_adam_": dict(
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.01,
        eps=1e-8,
        amsgrad=True,
        maximize=False,
        decoupled_weight_decay=True,
    ),
    "fused_adamax_": dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False),
    "fused_nadam_": dict(
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.01,
        eps=1e-8,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
        maximize=False,
    ),
    "fused_lamb_": dict(
        lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-6, bias_correction=True, maximize=False
    ),
}

# The list arguments of each op after (params, grads), in schema order. "step" and "mu" lists hold
# one-element fp32 tensors; the others are buffers shaped like the parameters.
OP_LISTS: dict[str, tuple[str, ...]] = {
    "fused_sgd_": ("momentum_buffers", "master_params"),
    "fused_adagrad_": ("state_sums", "state_steps", "master_params"),
    "fused_rmsprop_": ("square_avgs", "momentum_buffers", "grad_avgs", "state_steps", "master_params"),
    "fused_adam_": ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params"),
    "fused_adamax_": ("exp_avgs", "exp_infs", "state_steps", "master_params"),
    "fused_nadam_": ("exp_avgs", "exp_avg_sqs", "mu_products", "state_steps", "master_params"),
    "fused_lamb_": ("exp_avgs", "exp_avg_sqs", "state_steps", "master_params"),
}

OP_NAMES = tuple(OP_HYPER)


def op_inputs(
    name: str,
    shapes: Sequence[tuple[int, ...]] = ((7,), (3, 5)),
    device: str | torch.device = "cpu",
    steps_done: int = 3,
    dtype: torch.dtype = torch.float32,
    master: bool = False,
) -> dict[str, Any]:
    """Valid arguments of one call of op `name`, as a dict keyed by schema name, with state as after
    `steps_done` earlier steps (positive second moments, nonzero counters). With `master`, the
    (bf16/fp16) params get fp32 master copies and the state is fp32, as the kernels require."""
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    args: dict[str, Any] = {
        "params": params,
        "grads": [torch.randn(s, device=device).to(dtype) for s in shapes],
    }
    state_dtype = torch.float32 if master else dtype
    for key in OP_LISTS[name]:
        if key == "master_params":
            args[key] = [p.float() for p in params] if master else []
        elif key == "state_steps":
            args[key] = [torch.full((), float(steps_done), device=device) for _ in shapes]
        elif key == "mu_products":
            args[key] = [torch.full((), 0.9**steps_done, device=device) for _ in shapes]
        elif key in ("exp_avg_sqs", "max_exp_avg_sqs", "square_avgs", "state_sums", "exp_infs"):
            # Second moments / accumulators are positive; square_avg > grad_avg^2 keeps centered RMSprop's
            # sqrt real.
            args[key] = [torch.rand(s, device=device, dtype=state_dtype) + 1.0 for s in shapes]
        else:
            args[key] = [0.1 * torch.randn(s, device=device, dtype=state_dtype) for s in shapes]
    args.update(OP_HYPER[name])
    return args


def op_call_args(name: str, args: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) arguments of the op: the tensor lists, then the keyword-only scalars."""
    lists = ("params", "grads", *OP_LISTS[name])
    return tuple(args[k] for k in lists), {k: v for k, v in args.items() if k not in lists}


def call_op(name: str, args: dict[str, Any]) -> None:
    positional, keywords = op_call_args(name, args)
    getattr(torch.ops.fastdl, name)(*positional, **keywords)


def tensors_of(args: dict[str, Any]) -> list[Tensor]:
    """Every tensor of an op call, in a fixed order, for before/after comparisons."""
    out = []
    for value in args.values():
        if isinstance(value, Tensor):
            out.append(value)
        elif isinstance(value, list):
            out.extend(value)
    return out
