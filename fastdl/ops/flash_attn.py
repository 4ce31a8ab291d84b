"""Flash attention: ``torch.ops.fastdl.flash_attn_{fwd,bwd}`` and their varlen twins, with
FlashAttention-2's Python API on top (``flash_attn_func`` & co) and a pure-PyTorch reference
(:func:`attention_ref`) with the same signature.

Differences from FlashAttention-2, all deliberate:

* ``dropout_p > 0`` raises ``NotImplementedError``.
* ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the attention matrix is never formed.
* ``softmax_lse`` is fp32, or fp64 for fp64 inputs (so that fp64 gradcheck holds); as in FA2 it is
  ``+inf`` for a query row that sees no key, whose output is 0.
* Gradients flow through ``softmax_lse`` too (d lse / d score = P), not only through ``out``.
* ``deterministic`` is accepted and ignored: the backward is always reproducible bit for bit for a given
  number of threads.
* Any head dim from 1 to 256 works, and q/k/v may have any strides with a contiguous last dimension.
* ALiBi is added after soft-capping, as FA2's reference (``attention_ref`` in its tests) defines it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "attention_ref",
    "attention_varlen_ref",
]

_ops = torch.ops.fastdl


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake (meta) kernels: shapes only, for torch.compile and FakeTensor ------------------------------


@torch.library.register_fake("fastdl::flash_attn_fwd")
def _fwd_fake(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("fastdl::flash_attn_varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_left, window_right, softcap, alibi_slopes):
    total_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((nheads, total_q), dtype=_lse_dtype(q.dtype))


def _bwd_fake(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


torch.library.register_fake("fastdl::flash_attn_bwd")(_bwd_fake)
torch.library.register_fake("fastdl::flash_attn_varlen_bwd")(_bwd_fake)


# ---- autograd -----------------------------------------------------------------------------------------
#
# The forward saves q, k, v, out and softmax_lse (O(seqlen) beyond the inputs); the backward recomputes
# the attention tile by tile. The non-tensor inputs after q, k, v are passed through unchanged.


def _dense_grad(g: Optional[Tensor]) -> Optional[Tensor]:
    # Incoming gradients can be expanded (stride 0) views, e.g. from out.sum(); the kernel wants a
    # contiguous last dim, and dsoftmax_lse the layout of softmax_lse (contiguous).
    return None if g is None else g.contiguous()


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, alibi_slopes)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)


def _fwd_backward(ctx, dout, dsoftmax_lse):
    q, k, v, out, softmax_lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_bwd(_dense_grad(dout), q, k, v, out, softmax_lse, _dense_grad(dsoftmax_lse),
                                     *ctx.options, alibi_slopes)
    return (dq, dk, dv) + (None,) * 6  # softmax_scale .. alibi_slopes


def _varlen_fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes) = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)


def _varlen_fwd_backward(ctx, dout, dsoftmax_lse):
    q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_varlen_bwd(_dense_grad(dout), q, k, v, out, softmax_lse,
                                            _dense_grad(dsoftmax_lse), cu_seqlens_q, cu_seqlens_k,
                                            *ctx.options, alibi_slopes)
    return (dq, dk, dv) + (None,) * 10  # cu_seqlens_q .. alibi_slopes


torch.library.register_autograd("fastdl::flash_attn_fwd", _fwd_backward, setup_context=_fwd_setup_context)
torch.library.register_autograd("fastdl::flash_attn_varlen_fwd", _varlen_fwd_backward,
                                setup_context=_varlen_fwd_setup_context)


# ---- public API (FlashAttention-2's) --------------------------------------------------------------------


def _check(dropout_p: float, q: Tensor, others: dict) -> None:
    """What the kernel cannot see: dropout, and tensors on another device (a mix of devices would be
    dispatched to one backend's kernel, or to the fake kernel, before any check ran)."""
    if dropout_p > 0:
        raise NotImplementedError(
            f"fastdl flash attention does not implement dropout yet (dropout_p={dropout_p})")
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """softmax(q k^T * softmax_scale + masks) v, without forming the attention matrix.

    Args:
        q: (batch, seqlen_q, nheads, headdim), float32/float64/bfloat16/float16, headdim <= 256.
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA; MQA when nheads_k == 1).
            Any strides with a contiguous last dimension.
        dropout_p: must be 0 (dropout is not implemented).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: query i sees keys j <= i + seqlen_k - seqlen_q (aligned to the bottom-right corner).
            With seqlen_q = 2, seqlen_k = 5 (1 = attends)::

                1 1 1 1 0
                1 1 1 1 1

            and with seqlen_q = 5, seqlen_k = 2 the first three rows see nothing; their output is 0::

                0 0
                0 0
                0 0
                1 0
                1 1

        window_size: (left, right): query i sees keys in [i + seqlen_k - seqlen_q - left,
            i + seqlen_k - seqlen_q + right]; -1 leaves that side unbounded. causal sets right = 0.
        softcap: > 0 caps scores to softcap * tanh(score / softcap) (Gemma 2, Grok).
        alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + seqlen_k - seqlen_q - j|
            to the score of query i and key j.
        deterministic: ignored; the backward is always deterministic.
        return_attn_probs: also return softmax_lse (batch, nheads, seqlen_q), fp32 (fp64 for fp64
            inputs), +inf for rows that see no key, and None where FA2 returns the dropout mask.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, None).
    """
    _check(dropout_p, q, {"k": k, "v": v, "alibi_slopes": alibi_slopes})
    out, softmax_lse = _ops.flash_attn_fwd(q, k, v, _scale(q, softmax_scale), causal, window_size[0],
                                           window_size[1], softcap, alibi_slopes)
    return (out, softmax_lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_func` on qkv (batch, seqlen, 3, nheads, headdim), read in place through strides."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_func` with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_func` on sequences of different lengths packed without padding.

    Args:
        q: (total_q, nheads, headdim); sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1.
        k, v: (total_k, nheads_k, headdim), split by cu_seqlens_k.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), non-decreasing from 0 to total_q / total_k.
        max_seqlen_q, max_seqlen_k: at least the longest sequence.
        The rest as :func:`flash_attn_func`; masks and ALiBi apply per sequence, and alibi_slopes may be
        (batch, nheads).

    Returns:
        out (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q), None).
    """
    _check(dropout_p, q, {"k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                          "alibi_slopes": alibi_slopes})
    out, softmax_lse = _ops.flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                  max_seqlen_k, _scale(q, softmax_scale), causal,
                                                  window_size[0], window_size[1], softcap, alibi_slopes)
    return (out, softmax_lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_varlen_func` with qkv (total, 3, nheads, headdim)."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_varlen_func` with kv (total_k, 2, nheads_k, headdim)."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# ---- reference ----------------------------------------------------------------------------------------


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    upcast: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_func` written plainly: the full score matrix and explicit boolean masks.

    upcast=True computes bf16/fp16 inputs in fp32 (fp32 and fp64 inputs compute in their own dtype);
    upcast=False computes in the input dtype, the baseline the tests hold the kernel's error against.
    The output has the input dtype; softmax_lse is in the compute dtype (at least fp32).
    """
    if dropout_p > 0:
        raise NotImplementedError("attention_ref does not implement dropout")
    dtype = q.dtype
    if upcast and dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    k = k.repeat_interleave(nheads // k.shape[2], dim=2)  # (b, s_k, h, d)
    v = v.repeat_interleave(nheads // v.shape[2], dim=2)
    scale = headdim ** -0.5 if softmax_scale is None else softmax_scale

    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (b, h, s_q, s_k)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    # Query i sits at key position i + seqlen_k - seqlen_q (bottom-right alignment).
    i = torch.arange(seqlen_q, device=q.device).view(-1, 1) + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k, device=q.device).view(1, -1)
    if alibi_slopes is not None:
        slopes = alibi_slopes.view(-1, nheads, 1, 1)  # (1 or b, h, 1, 1)
        scores = scores - (slopes * (i - j).abs()).to(scores.dtype)
    left, right = window_size
    if causal:
        right = 0
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    row_visible = visible.any(-1, keepdim=True)  # (s_q, 1); False: the row sees no key
    # Rows that see nothing get scores 0 rather than all -inf so that softmax stays finite; their
    # attention is then zeroed.
    scores = scores.masked_fill(~visible, -math.inf).masked_fill(~row_visible, 0.0)
    softmax_lse = torch.logsumexp(scores.to(_lse_dtype(scores.dtype)), dim=-1)
    softmax_lse = softmax_lse.masked_fill(~row_visible.squeeze(-1), math.inf)  # (b, h, s_q)
    attn = torch.softmax(scores, dim=-1).masked_fill(~row_visible, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", attn, v).to(dtype)  # (b, s_q, h, d)
    return (out, softmax_lse, None) if return_attn_probs else out


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    upcast: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor, None]]:
    """:func:`flash_attn_varlen_func` as a loop of :func:`attention_ref` over the sequences."""
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse, _ = attention_ref(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], dropout_p, softmax_scale,
                                    causal, window_size, softcap, slopes, return_attn_probs=True,
                                    upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs)  # (total_q, h, d)
    softmax_lse = torch.cat(lses, dim=1)  # (h, total_q)
    return (out, softmax_lse, None) if return_attn_probs else out
