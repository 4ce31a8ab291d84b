"""Attention over a KV cache, paged or contiguous: FlashAttention's ``flash_attn_with_kvcache`` on top of
``torch.ops.fastdl.flash_attn_with_kvcache``, vLLM's cache writers ``reshape_and_cache`` and
``copy_blocks``, and pure-PyTorch references beside each (:func:`flash_attn_with_kvcache_ref`,
:func:`reshape_and_cache_ref`, :func:`copy_blocks_ref`) with the same signatures.

A paged cache (vLLM's PagedAttention, Kwon et al. 2023) stores keys in fixed-size blocks, like pages of
virtual memory::

    k_cache     (num_blocks, block_size, nheads_k, headdim)
    block_table (batch, max_blocks_per_seq) int32:  token t of sequence b is row t % block_size of block
                                                    block_table[b, t // block_size]
    slot        block * block_size + row            (what reshape_and_cache takes)

Blocks may be shared between sequences (a common prompt prefix) and need not be contiguous or ordered.

Differences from FlashAttention's ``flash_attn_with_kvcache``, all deliberate:

* ``block_size`` may be any multiple of 8 (FlashAttention-2 wants multiples of 256).
* ``rotary_cos``/``rotary_sin``, ``cache_batch_idx`` and ``cache_leftpad`` are not implemented.
* ``softmax_lse`` is ``+inf`` for a query row that sees no key (e.g. an empty cache), whose output is 0.
* There is no autograd: this is an inference op.

Kernels: CPU (csrc/paged_attn/paged_attn_cpu.cpp) for fp32, fp64, bf16 and fp16; CUDA
(paged_attn_kernel.cuh) for fp16 and bf16 with headdim a multiple of 8, fp32 softmax in both.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastdl.ops.flash_attn import attention_ref

__all__ = [
    "flash_attn_with_kvcache",
    "reshape_and_cache",
    "copy_blocks",
    "flash_attn_with_kvcache_ref",
    "reshape_and_cache_ref",
    "copy_blocks_ref",
]

_ops = torch.ops.fastdl


# ---- fake (meta) kernels: shapes only, for torch.compile and FakeTensor ------------------------------------
# The caches are mutated in place (Tensor(a!) in the schemas), which functionalization reads from the schema.


@torch.library.register_fake("fastdl::flash_attn_with_kvcache")
def _kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_left,
                  window_right, softcap, alibi_slopes, num_splits=0):
    batch, seqlen_q, nheads, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=lse_dtype)


@torch.library.register_fake("fastdl::reshape_and_cache")
def _reshape_and_cache_fake(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("fastdl::copy_blocks")
def _copy_blocks_fake(k_cache, v_cache, block_mapping):
    return None


# ---- public API --------------------------------------------------------------------------------------------


def _cache_seqlens(cache_seqlens: Optional[Union[int, Tensor]], q: Tensor, k_cache: Tensor,
                   block_table: Optional[Tensor], seqlen_new: int) -> Tensor:
    """cache_seqlens as int32 (batch,): an int applies to every sequence; None means the cache is full
    (every row of a contiguous cache, or every block of the table) before the new keys are appended."""
    batch = q.shape[0]
    if isinstance(cache_seqlens, Tensor):
        return cache_seqlens
    if cache_seqlens is None:
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        cache_seqlens = capacity - seqlen_new
    if not isinstance(cache_seqlens, int):
        raise TypeError(f"cache_seqlens must be an int, an int32 tensor or None, got {type(cache_seqlens).__name__}")
    return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_softmax_lse: bool = False,
    num_splits: int = 0,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of q over a KV cache, appending new keys and values into the cache first (in place).

    Args:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q is 1 when decoding, the prompt length in a
            prefill over a cache.
        k_cache, v_cache: paged (num_blocks, block_size, nheads_k, headdim) with ``block_table``, block_size a
            multiple of 8; or contiguous (batch, seqlen_cache, nheads_k, headdim) without. nheads % nheads_k
            == 0 (GQA; MQA when nheads_k == 1). The dtype of q; contiguous last dimension.
        k, v: optional (batch, seqlen_new, nheads_k, headdim): written into the caches at positions
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of each sequence before attending.
        cache_seqlens: int32 (batch,) or an int: keys already in the cache. Sequence b then has
            seqlen_k = cache_seqlens[b] + seqlen_new keys. None: the cache is full.
        block_table: int32 (batch, max_blocks_per_seq); entries past a sequence's last block are not read.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right aligned: the last query is the
            newest key). With seqlen_q = 2 and seqlen_k = 5::

                1 1 1 1 0
                1 1 1 1 1

        window_size: (left, right): query i sees keys in [i + seqlen_k - seqlen_q - left,
            i + seqlen_k - seqlen_q + right]; -1 leaves that side unbounded.
        softcap: > 0 caps scores to softcap * tanh(score / softcap).
        alibi_slopes: float32 (nheads,) or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j|.
        return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q), fp32.
        num_splits: split-K chunks per sequence (flash-decoding); 0 lets the kernel choose.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse).
    """
    for name, t in {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "block_table": block_table,
                    "alibi_slopes": alibi_slopes,
                    "cache_seqlens": cache_seqlens if isinstance(cache_seqlens, Tensor) else None}.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    seqlens = _cache_seqlens(cache_seqlens, q, k_cache, block_table, 0 if k is None else k.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, softmax_lse = _ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens, block_table, scale, causal,
                                                    window_size[0], window_size[1], softcap, alibi_slopes, num_splits)
    return (out, softmax_lse) if return_softmax_lse else out


def reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Writes tokens into their cache slots, in place.

    Args:
        key, value: (num_tokens, nheads_k, headdim), the dtype of the caches.
        k_cache, v_cache: (num_blocks, block_size, nheads_k, headdim), block_size a multiple of 8.
        slot_mapping: int64 (num_tokens,): token n goes to row slot % block_size of block slot // block_size;
            a negative slot (padding) skips the token.
    """
    _ops.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def copy_blocks(k_cache: Tensor, v_cache: Tensor, block_mapping: Tensor) -> None:
    """Copy-on-write of whole blocks, in place: for each row (src, dst) of block_mapping, int64
    (num_pairs, 2), block dst of both caches becomes a copy of block src. Destinations must be distinct and
    must not be sources of other pairs (the pairs are copied in parallel)."""
    _ops.copy_blocks(k_cache, v_cache, block_mapping)


# ---- references ---------------------------------------------------------------------------------------------


def reshape_and_cache_ref(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """:func:`reshape_and_cache` by index assignment on the (num_blocks * block_size) rows of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = key[keep]
    v_cache[slots // block_size, slots % block_size] = value[keep]


def copy_blocks_ref(k_cache: Tensor, v_cache: Tensor, block_mapping: Tensor) -> None:
    """:func:`copy_blocks` one pair at a time."""
    for src, dst in block_mapping.tolist():
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def gather_kv(cache: Tensor, block_table: Optional[Tensor], b: int, seqlen_k: int) -> Tensor:
    """The first seqlen_k rows (seqlen_k, nheads_k, headdim) of sequence b, through the block table."""
    if block_table is None:
        return cache[b, :seqlen_k]
    block_size = cache.shape[1]
    blocks = block_table[b, : -(-seqlen_k // block_size)].long()
    return cache[blocks].flatten(0, 1)[:seqlen_k]


def flash_attn_with_kvcache_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_softmax_lse: bool = False,
    num_splits: int = 0,
    *,
    upcast: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`flash_attn_with_kvcache` written plainly: append k/v by index assignment, gather each
    sequence's keys through the block table, and run dense attention (:func:`attention_ref`, fp32 for
    bf16/fp16 inputs with upcast=True, the input dtype with upcast=False). num_splits is ignored."""
    batch = q.shape[0]
    seqlen_new = 0 if k is None else k.shape[1]
    seqlens = _cache_seqlens(cache_seqlens, q, k_cache, block_table, seqlen_new).tolist()
    if k is not None:
        for b in range(batch):
            pos = torch.arange(seqlens[b], seqlens[b] + seqlen_new, device=q.device)
            if block_table is None:
                k_cache[b, pos] = k[b]
                v_cache[b, pos] = v[b]
            else:
                bs = k_cache.shape[1]
                blocks = block_table[b].long()[pos // bs]
                k_cache[blocks, pos % bs] = k[b]
                v_cache[blocks, pos % bs] = v[b]
    outs, lses = [], []
    for b in range(batch):
        seqlen_k = seqlens[b] + seqlen_new
        kb = gather_kv(k_cache, block_table, b, seqlen_k).unsqueeze(0)
        vb = gather_kv(v_cache, block_table, b, seqlen_k).unsqueeze(0)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse, _ = attention_ref(q[b : b + 1], kb, vb, softmax_scale=softmax_scale, causal=causal,
                                    window_size=window_size, softcap=softcap, alibi_slopes=slopes,
                                    return_attn_probs=True, upcast=upcast)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]), dtype=torch.float32)
    return (out, lse) if return_softmax_lse else out
