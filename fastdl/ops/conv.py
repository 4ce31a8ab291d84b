"""Fused 2D convolution: ``conv2d_fused`` computes, in one kernel,

    out = act(conv2d(x, weight) * scale + shift + bias + residual)

with ``scale`` / ``shift`` per output channel (a BatchNorm folded for inference, or any affine), an
optional ``residual`` of the output's shape, and ``act`` one of None, "relu", "leaky_relu",
("leaky_relu", slope), "silu", "gelu" (exact, erf), "sigmoid", "tanh". ``conv2d_fused_ref`` is the same
in plain PyTorch.

The CPU kernel is an implicit GEMM over tiles of output pixels with the epilogue on the hot tile
(csrc/conv/conv_cpu.cpp); the backward recomputes each tile's conv and fuses the activation's derivative
into the gradient GEMMs' prologue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)

IntOr2 = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int]]
ActivationArg = Union[None, str, tuple[str, float]]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh")
DEFAULT_LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default


def parse_activation(activation: ActivationArg) -> tuple[str, float]:
    """None / name / ("leaky_relu", slope) -> (name or "none", slope)."""
    if activation is None:
        return "none", 0.0
    if isinstance(activation, (tuple, list)):
        if len(activation) != 2 or activation[0] != "leaky_relu":
            raise ValueError(f"activation: the tuple form is ('leaky_relu', slope), got {activation!r}")
        return "leaky_relu", float(activation[1])
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, one of {ACTIVATIONS} or ('leaky_relu', slope), "
                         f"got {activation!r}")
    return activation, DEFAULT_LEAKY_SLOPE if activation == "leaky_relu" else 0.0


def _pair(name: str, v: IntOr2) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or 2 ints (h, w), got {v!r}")
    return int(v[0]), int(v[1])  # indexing, not a generator: see _call_op


def parse_padding(padding: Padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """int, (ph, pw), (top, bottom, left, right), "valid" or "same" -> (top, bottom, left, right).

    "same" follows torch: stride 1 only, total padding dilation * (k - 1), the odd one on the bottom /
    right."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding must be an int, 2 or 4 ints, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as torch), got stride {stride}")
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out[0], out[1], out[2], out[3]
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        ph, pw = int(padding[0]), int(padding[1])
        return ph, ph, pw, pw
    if len(padding) == 4:
        return int(padding[0]), int(padding[1]), int(padding[2]), int(padding[3])
    raise ValueError(f"padding must be an int, 2 ints (h, w) or 4 ints (top, bottom, left, right), got {padding!r}")


def conv2d_fused(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOr2 = 1,
    padding: Padding = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    activation: ActivationArg = None,
    residual: Optional[Tensor] = None,
    packed_weight: Optional[Tensor] = None,
) -> Tensor:
    """``act(conv2d(x, weight) * scale + shift + bias + residual)`` in one pass.

    Args:
        x: ``(N, C_in, H, W)``, NCHW or channels_last; fp32, fp64, bf16 or fp16 (math in fp32, fp64 for fp64).
        weight: ``(C_out, C_in / groups, kH, kW)``, x's dtype.
        bias, scale, shift: ``(C_out,)`` or None, x's dtype or fp32. ``bias`` is not scaled.
        stride, dilation: int or (h, w).
        padding: int, (h, w), (top, bottom, left, right), "same" (stride 1) or "valid".
        groups: divides C_in and C_out; groups = C_in is depthwise.
        activation: None, "relu", "leaky_relu" (slope 0.01, torch's default), ("leaky_relu", slope),
            "silu", "gelu" (erf form), "sigmoid" or "tanh".
        residual: ``(N, C_out, H_out, W_out)`` in x's dtype, added before the activation.
        packed_weight: CPU only, ``conv2d_pack_weight(weight, groups)`` of this very weight, or None: the
            forward then skips packing the weight (a per-call reorder of every weight byte). The caller
            repacks after changing the weight; :class:`fastdl.nn.Conv2d` does so in inference.

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's dtype and memory format, with
        ``H_out = (H + top + bottom - dilation_h * (kH - 1) - 1) // stride_h + 1`` (likewise W_out).
        Differentiable in x, weight, bias, scale, shift and residual.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (C_out, C_in / groups, kH, kW), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    stride2, dilation2 = _pair("stride", stride), _pair("dilation", dilation)
    pad4 = parse_padding(padding, (weight.shape[2], weight.shape[3]), stride2, dilation2)
    act, slope = parse_activation(activation)
    _check_args(x, weight, bias, stride2, pad4, dilation2, groups, scale, shift, residual)
    if packed_weight is not None and packed_weight.device != x.device:
        raise ValueError(f"packed_weight is on {packed_weight.device} but x is on {x.device}; all tensors must be "
                         f"on one device")
    if packed_weight is not None and packed_weight.numel() == 0:
        packed_weight = None  # conv2d_pack_weight's "no panels for this weight"
    return _call_op(x, weight, bias, [stride2[0], stride2[1]], [pad4[0], pad4[1], pad4[2], pad4[3]],
                    [dilation2[0], dilation2[1]], groups, scale, shift, act, slope, residual, packed_weight)


def _call_op(*args) -> Tensor:
    """torch.ops.fastdl.conv2d_fused. With grad mode off (inference), below the autograd dispatch keys: the
    op's autograd layer (register_autograd, in Python) would only redispatch, and costs ~4.5 us and ~20
    tracked Python objects per call. Those objects (like every generator, list() or dict() call on this
    path) advance the cyclic GC's allocation count, ~60 per call before: a full collection (~80 ms with
    torch and fx loaded) came every ~600 calls of a 0.7 ms conv."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.ops.fastdl.conv2d_fused(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastdl.conv2d_fused(*args)


def conv2d_pack_weight(weight: Tensor, groups: int = 1) -> Tensor:
    """The CPU forward's weight panels, for ``conv2d_fused(..., packed_weight=...)``.

    Args:
        weight: ``(C_out, C_in / groups, kH, kW)`` on the CPU, float32, bfloat16 or float16 (float64 packs
            to nothing).
        groups: as for the conv.

    Returns:
        1-D float32: per group, ``ceil(C_out_g / Nb)`` row-major ``[kH * kW * C_in_g, Nb]`` panels, ``Nb =
        min(64, C_out_g rounded up to 16)``, rows ordered (kh, kw, ci), zero past ``C_out_g``. Empty when the
        CPU forward does not use panels (fewer than 16 channels per group in or out, or float64). A copy:
        it goes stale when the weight changes.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (C_out, C_in / groups, kH, kW), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.device.type != "cpu":
        raise ValueError(f"conv2d_pack_weight: the panels are the CPU kernel's layout; weight is on {weight.device}")
    return torch.ops.fastdl.conv2d_pack_weight(weight, groups)


def _packed_numel(weight: Tensor, groups: int) -> int:
    cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
    if weight.dtype == torch.float64 or cin_g < 16 or cout_g < 16:
        return 0
    nb = min(64, (cout_g + 15) // 16 * 16)
    return groups * ((cout_g + nb - 1) // nb) * cin_g * weight.shape[2] * weight.shape[3] * nb


@torch.library.register_fake("fastdl::conv2d_pack_weight")
def _conv2d_pack_weight_fake(weight, groups):
    return weight.new_empty((_packed_numel(weight, groups),), dtype=torch.float32)


def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    oh = (x.shape[2] + padding[0] + padding[1] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + padding[2] + padding[3] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return oh, ow


def _check_args(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual) -> None:
    """The kernel's checks, raised as ValueError in the caller's terms before dispatch."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C_in, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
                         f"dilation {dilation}, padding {padding}")
    cin, cout = x.shape[1], weight.shape[0]
    if groups < 1 or cin % groups or cout % groups:
        raise ValueError(f"groups ({groups}) must divide the input channels ({cin}) and the output channels ({cout})")
    if weight.shape[1] * groups != cin:
        raise ValueError(f"channel mismatch: x has {cin} channels, so weight.shape[1] must be C_in / groups = "
                         f"{cin // groups}, got weight of shape {tuple(weight.shape)}")
    eff = dilation[0] * (weight.shape[2] - 1) + 1, dilation[1] * (weight.shape[3] - 1) + 1
    padded = x.shape[2] + padding[0] + padding[1], x.shape[3] + padding[2] + padding[3]
    if eff[0] > padded[0] or eff[1] > padded[1]:
        raise ValueError(f"the (dilated) kernel {eff[0]}x{eff[1]} is larger than the padded input "
                         f"{padded[0]}x{padded[1]}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if t.shape != (cout,):
            raise ValueError(f"{name} must have shape (C_out,) = ({cout},), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32, torch.float64):
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}) or float32, got {t.dtype}")
    if residual is not None:
        want = (x.shape[0], cout, *_output_hw(x, weight, stride, padding, dilation))
        if residual.shape != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}")


def _out_memory_format(x: Tensor) -> torch.memory_format:
    # As the kernel: channels_last when x is channels_last and not also plain contiguous.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("fastdl::conv2d_fused")
def _conv2d_fused_fake(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, slope,
                       residual, packed_weight=None):
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow)).contiguous(memory_format=_out_memory_format(x))


@torch.library.register_fake("fastdl::conv2d_fused_backward")
def _conv2d_fused_backward_fake(grad_out, x, weight, bias, stride, padding, dilation, groups, scale, shift,
                                activation, slope, residual):
    empty = x.new_empty((0,))
    dx = torch.empty_like(x)
    dres = empty if residual is None else grad_out.new_empty(grad_out.shape).contiguous(
        memory_format=_out_memory_format(x))
    return (dx, torch.empty_like(weight, memory_format=torch.contiguous_format),
            empty if bias is None else bias.new_empty(bias.shape),
            empty if scale is None else scale.new_empty(scale.shape),
            empty if shift is None else shift.new_empty(shift.shape), dres)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, slope, residual = inputs[:12]
    ctx.save_for_backward(x, weight, bias, scale, shift, residual)
    ctx.conf = (stride, padding, dilation, groups, activation, slope)


def _backward(ctx, grad_out):
    x, weight, bias, scale, shift, residual = ctx.saved_tensors
    stride, padding, dilation, groups, activation, slope = ctx.conf
    dx, dw, dbias, dscale, dshift, dres = torch.ops.fastdl.conv2d_fused_backward(
        grad_out, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, slope, residual)
    grads = dict(x=dx, weight=dw, bias=dbias if bias is not None else None,
                 scale=dscale if scale is not None else None, shift=dshift if shift is not None else None,
                 residual=dres if residual is not None else None)
    return (grads["x"], grads["weight"], grads["bias"], None, None, None, None, grads["scale"], grads["shift"],
            None, None, grads["residual"], None)


torch.library.register_autograd("fastdl::conv2d_fused", _backward, setup_context=_setup_context)


# ---- reference, in plain PyTorch ----------------------------------------------------------------------


def apply_activation_ref(y: Tensor, activation: ActivationArg) -> Tensor:
    act, slope = parse_activation(activation)
    if act == "none":
        return y
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    if act == "silu":
        return F.silu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    return torch.tanh(y)


def conv2d_fused_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOr2 = 1,
    padding: Padding = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    activation: ActivationArg = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """F.pad + F.conv2d + the epilogue as separate torch ops, in fp32 (fp64 for fp64); same signature
    and output dtype as :func:`conv2d_fused`."""
    stride2, dilation2 = _pair("stride", stride), _pair("dilation", dilation)
    top, bottom, left, right = parse_padding(padding, (weight.shape[2], weight.shape[3]), stride2, dilation2)
    mt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = F.pad(x.to(mt), (left, right, top, bottom))
    y = F.conv2d(xp, weight.to(mt), None, stride2, 0, dilation2, groups)
    view = (1, -1, 1, 1)
    if scale is not None:
        y = y * scale.to(mt).view(view)
    if shift is not None:
        y = y + shift.to(mt).view(view)
    if bias is not None:
        y = y + bias.to(mt).view(view)
    if residual is not None:
        y = y + residual.to(mt)
    return apply_activation_ref(y, activation).to(x.dtype)
