"""The CUDA paged-attention kernels (csrc/paged_attn/paged_attn_kernel.cuh), built by the host compiler and run
on the CPU with one std::thread per CUDA thread (tests/ops/paged_emu/host_cuda.h), against the references with
the 2x rule of test_paged_attn.py. This checks the kernels' logic where no GPU is available: block-table
lookups, tiles, masks, the online softmax, GQA rows, split-K and the combine kernel; not speed, and not the
hardware's memory model. Slow (building takes a minute or two): run with --runslow."""

import pytest
import torch

from fastdl.ops.paged_attn import flash_attn_with_kvcache_ref

from .paged_emu import load_paged_emu
from .test_paged_attn import assert_lse, assert_rule, make_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return load_paged_emu()


def check_emu(emu, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, causal=False,
              window_size=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0, sms=4):
    kw = dict(cache_seqlens=cache_seqlens, block_table=block_table, causal=causal, window_size=window_size,
              softcap=softcap, alibi_slopes=alibi_slopes)
    caches = [c.clone() for c in (k_cache, v_cache)]
    out, lse = emu.attn(q, *caches, k, v, cache_seqlens, block_table, q.shape[-1] ** -0.5, causal, window_size[0],
                        window_size[1], softcap, alibi_slopes, num_splits, sms)
    as64 = [None if x is None else x.double() for x in (q, k, v)]
    gold, gold_lse = flash_attn_with_kvcache_ref(as64[0], k_cache.double(), v_cache.double(), as64[1], as64[2],
                                                 return_softmax_lse=True, **kw)
    ref = flash_attn_with_kvcache_ref(q, k_cache.clone(), v_cache.clone(), k, v, upcast=False, **kw)
    assert_rule(out, gold, ref)
    assert_lse(lse, gold_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("headdim", [64, 128])
def test_decode_emu(emu, dtype, group, headdim):
    seqlens = [1, 16, 48, 37, 300]
    k_cache, v_cache, table, cache_seqlens = make_cache(seqlens, 16, 2, headdim, dtype=dtype, shared_prefix=1)
    q = torch.randn(len(seqlens), 1, 2 * group, headdim, dtype=dtype)
    check_emu(emu, q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 7])
@pytest.mark.parametrize("block_size", [8, 32])
def test_split_k_emu(emu, num_splits, block_size):
    k_cache, v_cache, table, cache_seqlens = make_cache([700, 5], block_size, 1, 64, dtype=torch.bfloat16)
    q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
    check_emu(emu, q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table, num_splits=num_splits)


def test_prefill_masks_emu(emu):
    """seqlen_q > 1 with appended keys: causal bottom-right, then window + softcap + ALiBi; 40 x 4 rows per
    kv-head span 10 query tiles; headdim 80 runs in the 128 kernel with zero-filled columns."""
    seqlens = [0, 15, 60]
    k_cache, v_cache, table, _ = make_cache([s + 40 for s in seqlens], 16, 2, 80, dtype=torch.float16)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(3, 40, 8, 80, dtype=torch.float16)
    k, v = torch.randn(2, 3, 40, 2, 80, dtype=torch.float16).unbind(0)
    check_emu(emu, q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table, causal=True)
    check_emu(emu, q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table, window_size=(20, 3),
              softcap=6.0, alibi_slopes=torch.rand(3, 8), num_splits=2)


def test_contiguous_and_empty_emu(emu):
    k_cache, v_cache = torch.randn(2, 3, 100, 1, 64, dtype=torch.bfloat16).unbind(0)
    q = torch.randn(3, 1, 2, 64, dtype=torch.bfloat16)
    check_emu(emu, q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 1, 100], dtype=torch.int32), num_splits=2)
