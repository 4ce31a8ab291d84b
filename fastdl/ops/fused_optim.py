"""Fused multi-tensor optimizer steps: ``torch.ops.fastdl.fused_<rule>_``.

Each op updates every tensor of a parameter group in place in one call (one pass over memory per
tensor), with the math of the matching torch.optim single-tensor implementation. The drop-in
optimizer classes in :mod:`fastdl.optim` call these; use them directly to build your own.

Arguments (see the schemas in csrc/ops.cpp): lists of params, grads, state buffers, one-element fp32
``state_steps`` (incremented by the op), optional fp32 ``master_params`` for bf16/fp16 params, then
keyword hyperparameters with torch.optim's names, and optional ``grad_scale`` / ``found_inf``
(torch.amp.GradScaler's contract: grads are divided by grad_scale; found_inf != 0 skips the step).

The references are torch.optim's own single-tensor implementations (``foreach=False``), which the
tests compare against, plus :func:`fastdl.optim.lamb.lamb_ref` for LAMB, which torch does not have.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastdl import _C

OPS = ("fused_sgd_", "fused_adagrad_", "fused_rmsprop_", "fused_adam_", "fused_adamax_", "fused_nadam_",
       "fused_lamb_")


def _make_entry(name: str) -> Callable[..., None]:
    op = getattr(torch.ops.fastdl, name)
    fast = getattr(_C.optim, name)
    schema = op.default._schema
    names = [a.name for a in schema.arguments]
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}

    def entry(*args: Any, **kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        # Positional call into pybind11: ~50 ns per tensor instead of the generic schema parser's ~2 us.
        values = list(args)
        for arg_name in names[len(args):]:
            values.append(kwargs[arg_name] if arg_name in kwargs else defaults[arg_name])
        fast(*values)

    entry.__name__ = name
    entry.__doc__ = f"torch.ops.fastdl.{name}: {schema}"
    return entry


def _fake_step(name: str) -> Callable[..., None]:
    def fake(*args: Any, **kwargs: Any) -> None:
        # The op mutates its inputs and returns nothing, so there is nothing to compute. But the
        # dispatcher also lands here when meta tensors are mixed with real ones: refuse, as the kernels do.
        devices = {t.device for arg in (*args, *kwargs.values())
                   for t in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"{name}: all tensors of one step must share a device, got "
                               f"{sorted(str(d) for d in devices)}")

    return fake


def _register_fakes() -> None:
    for name in OPS:
        torch.library.register_fake(f"fastdl::{name}")(_fake_step(name))


_register_fakes()

fused_sgd_ = _make_entry("fused_sgd_")
fused_adagrad_ = _make_entry("fused_adagrad_")
fused_rmsprop_ = _make_entry("fused_rmsprop_")
fused_adam_ = _make_entry("fused_adam_")
fused_adamax_ = _make_entry("fused_adamax_")
fused_nadam_ = _make_entry("fused_nadam_")
fused_lamb_ = _make_entry("fused_lamb_")
