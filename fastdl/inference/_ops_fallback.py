"""TEMPORARY stand-ins for fastdl.ops.paged_attn (branch paged-kernels) until it is merged."""

from __future__ import annotations

import torch

from fastdl.ops.flash_attn import flash_attn_func


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = key[keep]
    v_cache[slots // bs, slots % bs] = value[keep]


def copy_blocks(k_cache, v_cache, block_mapping):
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    assert k is None and v is None
    outs = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        blocks = block_table[b, : -(-n // k_cache.shape[1])].long()
        kk = k_cache[blocks].flatten(0, 1)[:n].unsqueeze(0)
        vv = v_cache[blocks].flatten(0, 1)[:n].unsqueeze(0)
        outs.append(flash_attn_func(q[b:b + 1], kk, vv, softmax_scale=softmax_scale, causal=causal,
                                    window_size=window_size))
    return torch.cat(outs)
