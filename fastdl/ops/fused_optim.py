"""Fused multi-tensor optimizer steps: ``torch.ops.fastdl.fused_<rule>_``.

Each op updates every tensor of a parameter group in place in one call (one pass over memory per
tensor), with the math of the matching torch.optim single-tensor implementation. The drop-in
optimizer classes in :mod:`fastdl.optim` call these; use them directly to build your own.

The references are torch.optim's own single-tensor implementations (``foreach=False``), which the
tests compare against, plus :func:`fastdl.optim.lamb.lamb_ref` for LAMB, which torch does not have.
"""

from __future__ import annotations

import torch

OPS = ("fused_sgd_", "fused_adagrad_", "fused_rmsprop_", "fused_adam_", "fused_adamax_", "fused_nadam_",
       "fused_lamb_")


def _register_fakes() -> None:
    # The ops only mutate their inputs and return nothing, so the fake kernel has nothing to compute.
    for name in OPS:
        torch.library.register_fake(f"fastdl::{name}")(lambda *args, **kwargs: None)


_register_fakes()

fused_sgd_ = torch.ops.fastdl.fused_sgd_
fused_adagrad_ = torch.ops.fastdl.fused_adagrad_
fused_rmsprop_ = torch.ops.fastdl.fused_rmsprop_
fused_adam_ = torch.ops.fastdl.fused_adam_
fused_adamax_ = torch.ops.fastdl.fused_adamax_
fused_nadam_ = torch.ops.fastdl.fused_nadam_
fused_lamb_ = torch.ops.fastdl.fused_lamb_
