"""The paged-attention model interface: what the engine hands a model each step, and the attention call
a model's layers make with it. See :mod:`fastdl.inference` for the protocol itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastdl.ops.paged_attn import flash_attn_with_kvcache, reshape_and_cache

__all__ = ["PagedKVSpec", "PagedAttentionMetadata", "paged_attention"]


@dataclass(frozen=True)
class PagedKVSpec:
    """What the engine needs to allocate a model's paged KV cache and to validate requests."""

    num_layers: int  # one (k_cache, v_cache) pair per layer
    num_kv_heads: int
    head_dim: int
    max_seq_len: int  # prompt + generated tokens at most (GPT: config.block_size)
    vocab_size: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class PagedAttentionMetadata:
    """One engine step's batch, flattened: num_seqs sequences, prefills first, then decodes, each
    contributing its query_lens[i] new tokens (a decode: 1) to the num_tokens rows of the inputs.

    slot_mapping: (num_tokens,) int64, the cache slot (block * block_size + offset) each new token's key and
        value are written to.
    block_tables: (num_seqs, max_blocks) int32, each sequence's blocks (rows padded with 0 past its blocks).
    seq_lens: (num_seqs,) int32, tokens in each sequence's cache once this step's are written: the keys its
        last query sees.
    query_lens: new tokens per sequence (python ints; sum = num_tokens).
    num_prefills: the first num_prefills sequences are prefills (query_len >= 1, attended one call each);
        the others are decodes (query_len == 1, attended in one batched call).
    logits_indices: (num_seqs,) int64, the row of each sequence's last new token: the logits to return.
    """

    slot_mapping: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query_lens: list[int]
    num_prefills: int
    logits_indices: Tensor

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_lens[:self.num_prefills])


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    meta: PagedAttentionMetadata, softmax_scale: Optional[float] = None, causal: bool = True,
                    window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """Writes the step's new keys and values into the paged cache, then attends each query to its sequence's
    cached keys (its own new ones included), causal and aligned bottom-right as in flash attention.

    Args:
        q: (num_tokens, nheads, headdim); k, v: (num_tokens, nheads_k, headdim), RoPE already applied.
        k_cache, v_cache: (num_blocks, block_size, nheads_k, headdim), updated in place.
    Returns:
        (num_tokens, nheads, headdim).
    """
    reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    row = 0
    for i in range(meta.num_prefills):  # one call per prompt: seqlen_q differs between them
        n = meta.query_lens[i]
        out[row:row + n] = flash_attn_with_kvcache(
            q[row:row + n].unsqueeze(0), k_cache, v_cache, cache_seqlens=meta.seq_lens[i:i + 1],
            block_table=meta.block_tables[i:i + 1], softmax_scale=softmax_scale, causal=causal,
            window_size=window_size)[0]
        row += n
    if row < q.shape[0]:  # the decodes: one query each, one batched call
        p = meta.num_prefills
        out[row:] = flash_attn_with_kvcache(
            q[row:].unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens[p:],
            block_table=meta.block_tables[p:], softmax_scale=softmax_scale, causal=causal,
            window_size=window_size)[:, 0]
    return out
