"""Depthwise causal conv1d: ``causal_conv1d_fn`` and ``causal_conv1d_update``, drop-ins for the
causal-conv1d package's, and the pure-PyTorch references beside them::

    out[b, d, t] = act(bias[d] + sum_{k < width} weight[d, k] * x[b, d, t - (width - 1) + k])

with x = 0 before t = 0, act = identity or silu ("silu" / "swish"), and width in [2, 8].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)
from fastdl.ops.selective_scan import _check_devices


def _use_silu(activation: Optional[str]) -> bool:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_fn(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """Causal depthwise conv1d.

    Args:
        x: ``(batch, dim, L)``, any layout (channel-last included); fp32 / bf16 / fp16 / fp64.
        weight: ``(dim, width)``, width in [2, 8], in x's dtype or fp32.  bias: ``(dim,)``, weight's dtype.
        activation: None, "silu" or "swish".

    Returns:
        ``(batch, dim, L)`` in x's dtype; differentiable in x, weight and bias.
    """
    return torch.ops.fastdl.causal_conv1d_fwd(x, weight, bias, _use_silu(activation))


@torch.library.register_fake("fastdl::causal_conv1d_fwd")
def _causal_conv1d_fwd_fake(x, weight, bias, silu):
    _check_devices("causal_conv1d_fwd", "x", x=x, weight=weight, bias=bias)
    return x.new_empty(x.shape)


@torch.library.register_fake("fastdl::causal_conv1d_bwd")
def _causal_conv1d_bwd_fake(x, weight, bias, dout, silu):
    _check_devices("causal_conv1d_bwd", "x", x=x, weight=weight, bias=bias, dout=dout)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _conv_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastdl.causal_conv1d_bwd(x, weight, bias, dout, ctx.silu)
    return dx, dweight, dbias if bias is not None else None, None


torch.library.register_autograd(
    "fastdl::causal_conv1d_fwd", _conv_backward, setup_context=_conv_setup_context
)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Decoding step(s): convolve x after the inputs held in ``conv_state``, which is updated in place.

    Args:
        x: ``(batch, dim)`` or ``(batch, dim, seqlen)``.
        conv_state: ``(batch, dim, state_len)``, state_len >= width - 1, x's dtype: the latest inputs,
            oldest first; shifted left by seqlen with x appended.
        weight, bias, activation: as :func:`causal_conv1d_fn`.

    Returns:
        Output of x's shape and dtype.
    """
    silu = _use_silu(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)  # (batch, dim, 1)
    out = torch.ops.fastdl.causal_conv1d_update(x, conv_state, weight, bias, silu)
    return out.squeeze(-1) if squeeze else out


@torch.library.register_fake("fastdl::causal_conv1d_update")
def _causal_conv1d_update_fake(x, conv_state, weight, bias, silu):
    _check_devices("causal_conv1d_update", "x", x=x, conv_state=conv_state, weight=weight, bias=bias)
    return x.new_empty(x.shape)


# ---- references, in plain PyTorch -------------------------------------------------------------------


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """F.conv1d with width - 1 zeros of left padding, in weight's dtype; same signature as the fast op."""
    silu = _use_silu(activation)
    dim, width = weight.shape
    seqlen = x.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight[:, None, :], bias, padding=width - 1, groups=dim)[..., :seqlen]
    return (F.silu(out) if silu else out).to(x.dtype)


def causal_conv1d_update_ref(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """:func:`causal_conv1d_ref` over [conv_state, x], keeping the output of x; updates conv_state."""
    silu = _use_silu(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    dim, width = weight.shape
    seqlen, state_len = x.shape[-1], conv_state.shape[-1]
    window = torch.cat([conv_state, x], dim=-1)  # (batch, dim, state_len + seqlen)
    conv_state.copy_(window[..., -state_len:])
    out = F.conv1d(window.to(weight.dtype), weight[:, None, :], bias, groups=dim)[..., -seqlen:]
    out = (F.silu(out) if silu else out).to(x.dtype)
    return out.squeeze(-1) if squeeze else out
