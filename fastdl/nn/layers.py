"""Building blocks of today's decoder-only transformers: RMSNorm, rotary position embeddings (RoPE), SwiGLU.

RMSNorm, the rotation of RoPE and SwiGLU's gate run on fastdl's fused kernels (:mod:`fastdl.ops.fused_layers`:
one pass over the activations each way instead of one per pointwise op); on a device without a fastdl kernel
they fall back to torch's composites, which compute the same thing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.ops.fused_layers import has_fused_layer_kernel, rms_norm, rotary_emb, rotary_emb_ref, swiglu

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rotary_emb", "SwiGLU", "swiglu_hidden_dim"]


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm on fastdl's fused kernel: same constructor (normalized_shape, eps=None,
    elementwise_affine=True, device, dtype), same state_dict ("weight"), same result up to rounding.

    The fused op computes in fp32 for bf16 / fp16 inputs (as F.rms_norm does) and saves only the per-row
    1 / rms for the backward. It falls back to torch's composite ``F.rms_norm`` where the op cannot run: a
    device without a fastdl kernel, or a weight whose dtype differs from the input's (e.g. an fp32 weight
    under bf16 activations), which the kernel does not take. Note that eps=None means
    torch.finfo(input.dtype).eps (1.2e-7 for fp32), not Llama's 1e-5 or 1e-6: models pass eps explicitly.
    """

    def forward(self, x: Tensor) -> Tensor:
        if has_fused_layer_kernel(x.device) and (self.weight is None or self.weight.dtype == x.dtype):
            return rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (RoFormer, arXiv:2104.09864): cos and sin of position * freq.

    Frequency i of a head of size ``dim`` is ``base ** (-2i / dim)``, i < dim / 2. The tables are computed
    on the fly in fp32 from the positions asked for: (seqlen, dim / 2) values, a few microseconds next to the
    attention itself, and nothing to store. Stored tables would be cast by ``model.to(torch.bfloat16)``,
    and bf16 cannot tell position 1000 from 1004 (8 bits of mantissa).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding needs an even head dim, got {dim}")
        self.dim = dim
        self.base = base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: integer (seqlen,) or (batch, seqlen).
        Returns cos, sin: fp32 (*positions.shape, dim / 2)."""
        exponent = torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim
        inv_freq = self.base ** -exponent  # (dim / 2,)
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., seqlen, dim / 2)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates x by its positions' angles, the two halves of the head dim as (real, imaginary) parts.

    This is the "rotate half" layout of GPT-NeoX and Hugging Face's Llama (not the interleaved pairs of
    Meta's Llama code): with x = (x1, x2) split at dim / 2, the result is
    (x1 cos - x2 sin, x2 cos + x1 sin), i.e. (x1 + i x2) * exp(i * angle).

    Args:
        x: (batch, seqlen, nheads, dim), any float dtype.
        cos, sin: (seqlen, dim / 2) or (batch, seqlen, dim / 2), from :class:`RotaryEmbedding`.

    Returns:
        x's shape and dtype; the rotation is computed in fp32 (fp64 for fp64 inputs). 4-D inputs on a device
        with a fastdl kernel run :func:`fastdl.ops.fused_layers.rotary_emb`; others, and tables that require
        grad (the kernel does not differentiate them), run the composite
        :func:`~fastdl.ops.fused_layers.rotary_emb_ref`.
    """
    if cos.shape[-1] * 2 != x.shape[-1]:
        raise ValueError(f"rotary tables have {cos.shape[-1]} frequencies for a head dim of {x.shape[-1]}, "
                         f"expected {x.shape[-1] // 2}")
    if x.dim() == 4 and has_fused_layer_kernel(x.device) and not (cos.requires_grad or sin.requires_grad):
        # The fused kernel takes strided q / k views as they come out of the qkv split; only the last dim
        # must be contiguous.
        return rotary_emb(x if x.stride(-1) == 1 else x.contiguous(), cos, sin)
    return rotary_emb_ref(x, cos, sin)


class SwiGLU(nn.Module):
    """The gated MLP of PaLM and Llama (Shazeer, arXiv:2002.05202): down(silu(gate(x)) * up(x)).

    The projections are named as in Hugging Face's Llama (gate_proj, up_proj, down_proj), so those weights
    load by name. A SwiGLU of hidden size 8/3 * dim costs what a GELU MLP of hidden size 4 * dim does.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if has_fused_layer_kernel(x.device):
            return self.down_proj(swiglu(gate, up))  # silu(gate) * up in one pass, fp32 math
        return self.down_proj(F.silu(gate) * up)


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Llama's hidden size: 2/3 of 4 * dim (so that the three matrices cost what GELU's two of 4 * dim do),
    times ffn_dim_multiplier, rounded up to a multiple of multiple_of (Llama 2 7B: dim 4096 -> 11008)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
