"""Fused kernels for the elementwise layers of a modern decoder: RMSNorm, rotary embeddings (RoPE) and the
SwiGLU gate, each with its pure-PyTorch reference beside it (same signature)::

    rms_norm(x, normalized_shape, weight, eps) = x / sqrt(mean(x^2 over normalized_shape) + eps) * weight
    rotary_emb(x, cos, sin) = (x1 cos - x2 sin, x2 cos + x1 sin),  (x1, x2) = halves of the head dim
    swiglu(gate, up)        = silu(gate) * up

Every op reads its inputs once and writes its outputs once (torch's composites make one pass per pointwise op),
computes in fp32 for fp32 / bf16 / fp16 storage (fp64 for fp64), and has a fused backward registered through
``torch.library.register_autograd``; fake kernels make them traceable by ``torch.compile(fullgraph=True)``.
Kernels: csrc/layers/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)
from fastdl.ops.selective_scan import _check_devices

__all__ = ["rms_norm", "rms_norm_ref", "rotary_emb", "rotary_emb_ref", "swiglu", "swiglu_ref",
           "has_fused_layer_kernel"]

# Device types with a fastdl kernel for these ops ("meta" runs the fake kernels). Computed once, so that
# the membership test below is a constant that torch.compile folds.
_KERNEL_DEVICES = frozenset(
    ["meta"] + [dev for dev in ("cpu", "cuda")
                if torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::swiglu_fwd", dev.upper())])


def has_fused_layer_kernel(device: torch.device) -> bool:
    """Whether fastdl has rms_norm / rotary_emb / swiglu kernels for ``device`` (the nn modules fall back to
    torch's composites where it has not)."""
    return device.type in _KERNEL_DEVICES


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- RMSNorm ----------------------------------------------------------------------------------------------


def _shape_list(normalized_shape: Union[int, Sequence[int]]) -> list[int]:
    return [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)


def rms_norm(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims (``F.rms_norm``'s signature).

    Args:
        x: ``(..., *normalized_shape)``, fp32 / fp64 / bf16 / fp16, any strides (a view when the leading dims
            collapse, else one copy).
        weight: ``normalized_shape`` in x's dtype, or None.
        eps: None means ``torch.finfo(x.dtype).eps``, as in torch.

    Returns:
        x's shape and dtype, contiguous; differentiable in x and weight.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    out, _ = torch.ops.fastdl.rms_norm_fwd(x, _shape_list(normalized_shape), weight, eps)
    return out


@torch.library.register_fake("fastdl::rms_norm_fwd")
def _rms_norm_fwd_fake(x, normalized_shape, weight, eps):
    _check_devices("rms_norm_fwd", "x", x=x, weight=weight)
    lead = x.shape[: x.dim() - len(normalized_shape)]
    return x.new_empty(x.shape), x.new_empty(lead, dtype=_math_dtype(x.dtype))


@torch.library.register_fake("fastdl::rms_norm_bwd")
def _rms_norm_bwd_fake(dout, x, normalized_shape, weight, rstd):
    _check_devices("rms_norm_bwd", "x", x=x, dout=dout, weight=weight, rstd=rstd)
    return x.new_empty(x.shape), (x.new_empty(weight.shape) if weight is not None else x.new_empty((0,)))


def _rms_norm_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.normalized_shape = normalized_shape


def _rms_norm_backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = torch.ops.fastdl.rms_norm_bwd(dout, x, ctx.normalized_shape, weight, rstd)
    return dx, None, dweight if weight is not None else None, None


torch.library.register_autograd("fastdl::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup_context)


def rms_norm_ref(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
                 eps: Optional[float] = None) -> Tensor:
    """Plain PyTorch, computed in fp32 (fp64 for fp64) and rounded once to x's dtype."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    dims = tuple(range(-len(_shape_list(normalized_shape)), 0))
    xf = x.to(_math_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


# ---- rotary embeddings -------------------------------------------------------------------------------------


def rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates x by its positions' angles, rotate-half layout (see :func:`fastdl.nn.apply_rotary_emb`).

    Args:
        x: ``(batch, seqlen, nheads, headdim)``, headdim even, last dim contiguous and other strides free, so
            the q and k views of a fused qkv projection go in without a copy.
        cos, sin: ``(seqlen, headdim / 2)`` or ``(batch, seqlen, headdim / 2)``; cast to fp32 (fp64 for fp64
            x). They are not differentiated.

    Returns:
        x's shape and dtype, contiguous; differentiable in x (the backward rotates by -angle).
    """
    dtype = _math_dtype(x.dtype)
    return torch.ops.fastdl.rotary_emb(x, cos.to(dtype), sin.to(dtype), False)


@torch.library.register_fake("fastdl::rotary_emb")
def _rotary_emb_fake(x, cos, sin, conjugate=False):
    _check_devices("rotary_emb", "x", x=x, cos=cos, sin=sin)
    return x.new_empty(x.shape)


def _rotary_setup_context(ctx, inputs, output):
    x, cos, sin, conjugate = inputs
    ctx.save_for_backward(cos, sin)
    ctx.conjugate = conjugate


def _rotary_backward(ctx, dout):
    cos, sin = ctx.saved_tensors
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
        dout = dout.contiguous()
    # A rotation's adjoint is its inverse: rotate the gradient back by -angle.
    return torch.ops.fastdl.rotary_emb(dout, cos, sin, not ctx.conjugate), None, None, None


torch.library.register_autograd("fastdl::rotary_emb", _rotary_backward, setup_context=_rotary_setup_context)


def rotary_emb_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Plain PyTorch (what fastdl.nn.apply_rotary_emb computed before the kernel): torch.cat of the halves."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos = cos.unsqueeze(-2).to(dtype)  # (..., seqlen, 1, dim / 2): the same angle for every head
    sin = sin.unsqueeze(-2).to(dtype)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---- SwiGLU ------------------------------------------------------------------------------------------------


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass.

    Args:
        gate, up: one shape and dtype (fp32 / fp64 / bf16 / fp16), any strides (a view when the leading dims
            collapse, e.g. the two halves of a fused gate/up projection).

    Returns:
        gate's shape and dtype, contiguous; differentiable in both.
    """
    return torch.ops.fastdl.swiglu_fwd(gate, up)


@torch.library.register_fake("fastdl::swiglu_fwd")
def _swiglu_fwd_fake(gate, up):
    _check_devices("swiglu_fwd", "gate", gate=gate, up=up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("fastdl::swiglu_bwd")
def _swiglu_bwd_fake(dout, gate, up):
    _check_devices("swiglu_bwd", "gate", gate=gate, up=up, dout=dout)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.fastdl.swiglu_bwd(dout, gate, up)


torch.library.register_autograd("fastdl::swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup_context)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """Plain PyTorch in fp32 (fp64 for fp64), rounded once to gate's dtype."""
    dtype = _math_dtype(gate.dtype)
    return (F.silu(gate.to(dtype)) * up.to(dtype)).to(gate.dtype)
