"""Convolution modules on :func:`fastdl.ops.conv2d_fused`.

* :class:`Conv2d`: a drop-in for ``torch.nn.Conv2d`` (same arguments, padding modes and state_dict).
* :class:`ConvBNAct`: conv -> BatchNorm2d -> activation (+ residual before the activation). Training
  mode uses batch statistics and updates the running stats exactly as ``torch.nn.BatchNorm2d``; eval
  mode folds the BN into the conv's per-channel scale / shift, so the whole block is one kernel.
* :class:`FusedConv2d`: an inference-only conv with a folded affine and activation, what
  :func:`fastdl.fuse` puts in place of Conv2d -> BatchNorm2d -> activation.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.ops.conv import ActivationArg, apply_activation_ref, conv2d_fused, conv2d_pack_weight, parse_activation

_size_2_t = Union[int, tuple[int, int]]


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by the fused kernel. Same constructor, attributes and state_dict
    (it *is* an nn.Conv2d), so weights load either way; padding_mode "zeros", "reflect", "replicate"
    or "circular"; ``padding`` also takes "same" / "valid" as torch's.

    ``forward(x, residual=None)``: the optional residual (output's shape) is added by the kernel's epilogue.

    Inference on the CPU (no graph through the weight: ``torch.no_grad()``, ``inference_mode`` or a frozen
    weight) packs the weight into the kernel's panel layout once (:func:`fastdl.ops.conv2d_pack_weight`) and
    keeps that copy until the weight changes (another tensor, or an in-place write, which bumps its version
    counter), as oneDNN's weight prepacking does: the per-call reorder is then skipped. It costs one more
    copy of the weight in memory.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        return self.fused_forward(x, residual=residual)

    def fused_forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                      activation: ActivationArg = None, residual: Optional[Tensor] = None,
                      include_bias: bool = True) -> Tensor:
        """``act(conv(x) * scale + shift + bias + residual)``, with the module's bias unless include_bias
        is False (when it has been folded into shift)."""
        bias = self.bias if include_bias else None
        if self.padding_mode != "zeros":
            # torch: pad explicitly with the mode, then convolve unpadded.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        elif isinstance(self.padding, str):
            padding = self.padding
        else:
            padding = self.padding
        return conv2d_fused(x, self.weight, bias, self.stride, padding, self.dilation, self.groups, scale, shift,
                            activation, residual, self._inference_packed_weight(x))

    def __getstate__(self):
        # The packed copy is a cache: not pickled, saved or deep-copied with the module.
        state = dict(super().__getstate__())
        state.pop("_packed_weight_cache", None)
        return state

    def _inference_packed_weight(self, x: Tensor) -> Optional[Tensor]:
        """The weight's CPU panels, packed on first use and kept while the weight is the same tensor data
        (storage and version counter), for forwards that build no graph through the weight; None otherwise
        (the kernel then packs per call)."""
        w = self.weight
        if (x.device.type != "cpu" or w.device.type != "cpu" or w.dtype == torch.float64 or w.is_inference()
                or (w.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()):
            return None
        key = (w.data_ptr(), w._version, w.dtype, w.shape, self.groups)
        cached = self.__dict__.get("_packed_weight_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, conv2d_pack_weight(w, self.groups))
            self.__dict__["_packed_weight_cache"] = cached
        return cached[1]


def _default_padding(kernel_size: _size_2_t, dilation: _size_2_t) -> tuple[int, int]:
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))


def fold_bn(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) with ``bn(conv + conv_bias) == conv * scale + shift`` in eval mode."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fold_bn: the BatchNorm2d has no running statistics (track_running_stats=False)")
    mt = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32  # fold in fp32 at least
    mean, var = bn.running_mean.to(mt), bn.running_var.to(mt)
    inv_std = torch.rsqrt(var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight.to(mt) * inv_std
    shift = -mean * scale if bn.bias is None else bn.bias.to(mt) - mean * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(mt) * scale
    return scale, shift


class ConvBNAct(nn.Module):
    """conv -> BatchNorm2d -> (+ residual) -> activation, as in ResNet blocks (``act(bn(conv(x)) + residual)``).

    Args:
        in_ch, out_ch, kernel_size, stride, dilation, groups, bias, padding_mode: as ``nn.Conv2d``;
            ``padding`` defaults to ``dilation * (kernel_size - 1) // 2`` ("same" for odd kernels).
        activation: None, "relu", "leaky_relu", ("leaky_relu", slope), "silu", "gelu", "sigmoid", "tanh".
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.

    Submodules ``.conv`` (:class:`Conv2d`) and ``.bn`` (``nn.BatchNorm2d``) give the state_dict keys
    ``conv.weight``, ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``,
    ``bn.num_batches_tracked``.

    Training (or without running stats): the conv runs in the fused kernel, then torch's batch norm
    (batch statistics, running-stat update as torch), then residual and activation. Eval: one fused
    kernel with the BN folded into per-channel scale / shift.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: _size_2_t, stride: _size_2_t = 1,
                 padding: Optional[Union[_size_2_t, str]] = None, groups: int = 1,
                 activation: ActivationArg = "relu", dilation: _size_2_t = 1, bias: bool = False,
                 padding_mode: str = "zeros", eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        parse_activation(activation)  # validate early
        if padding is None:
            padding = _default_padding(kernel_size, dilation)
        factory = dict(device=device, dtype=dtype)
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                           **factory)
        self.bn = nn.BatchNorm2d(out_ch, eps, momentum, affine, track_running_stats, **factory)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.training or self.bn.running_mean is None:
            y = self.bn(self.conv(x))  # torch's BN: batch stats, running-stat update, num_batches_tracked
            if residual is not None:
                y = y + residual
            return apply_activation_ref(y, self.activation)
        scale, shift = fold_bn(self.bn, self.conv.bias)
        mt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self.conv.fused_forward(x, scale.to(mt), shift.to(mt), self.activation, residual, include_bias=False)


class FusedConv2d(nn.Module):
    """Inference conv with a folded per-channel affine and activation: ``act(conv(x) * scale + shift +
    residual)``. Built by :func:`fastdl.fuse` from Conv2d -> BatchNorm2d -> activation (-> add); the
    conv's own bias must already be in ``shift`` (see :func:`fold_bn`)."""

    def __init__(self, conv: nn.Conv2d, scale: Optional[Tensor], shift: Optional[Tensor],
                 activation: ActivationArg = None) -> None:
        super().__init__()
        parse_activation(activation)
        self.conv = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, False, conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
        self.register_buffer("scale", None if scale is None else scale.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self.conv.fused_forward(x, self.scale, self.shift, self.activation, residual, include_bias=False)
