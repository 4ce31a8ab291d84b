"""The CUDA paged-attention kernels against the references (fp16 / bf16, fp32 softmax), with the 2x rule of
test_paged_attn.py. Marked `cuda`: skipped where there is no GPU or fastdl was built without CUDA."""

import pytest
import torch

from fastdl.ops.paged_attn import (
    copy_blocks,
    copy_blocks_ref,
    flash_attn_with_kvcache,
    flash_attn_with_kvcache_ref,
    reshape_and_cache,
    reshape_and_cache_ref,
)

from .test_paged_attn import assert_lse, assert_rule, make_cache

pytestmark = pytest.mark.cuda


def check_cuda(q, k_cache, v_cache, k=None, v=None, **kw):
    caches = [c.clone() for c in (k_cache, v_cache)]
    out, lse = flash_attn_with_kvcache(q, *caches, k, v, return_softmax_lse=True, **kw)
    cpu_kw = {name: (x.cpu() if isinstance(x, torch.Tensor) else x) for name, x in kw.items()}
    to64 = [None if x is None else x.cpu().double() for x in (q, k, v)]
    gold, gold_lse = flash_attn_with_kvcache_ref(to64[0], k_cache.cpu().double(), v_cache.cpu().double(), to64[1],
                                                 to64[2], return_softmax_lse=True, **cpu_kw)
    ref_caches = [c.clone() for c in (k_cache, v_cache)]
    ref = flash_attn_with_kvcache_ref(q, *ref_caches, k, v, upcast=False, **kw)
    assert_rule(out.cpu(), gold, ref.cpu())
    assert_lse(lse.cpu(), gold_lse)
    if k is not None:
        assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("headdim", [64, 128])
def test_decode_cuda(dtype, block_size, group, headdim):
    seqlens = [1, block_size, 3 * block_size, 37, 2000]
    k_cache, v_cache, table, seqlens_t = make_cache(seqlens, block_size, 2, headdim, dtype=dtype, shared_prefix=1,
                                                    device="cuda")
    q = torch.randn(len(seqlens), 1, 2 * group, headdim, dtype=dtype, device="cuda")
    check_cuda(q, k_cache, v_cache, cache_seqlens=seqlens_t, block_table=table)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 16])
@pytest.mark.parametrize("headdim", [80, 256])
def test_split_k_and_headdims_cuda(num_splits, headdim):
    k_cache, v_cache, table, seqlens_t = make_cache([5000, 3], 16, 2, headdim, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(2, 1, 8, headdim, dtype=torch.bfloat16, device="cuda")
    check_cuda(q, k_cache, v_cache, cache_seqlens=seqlens_t, block_table=table, num_splits=num_splits)


@pytest.mark.parametrize("seqlen_q", [1, 5, 40])
def test_append_prefill_window_softcap_alibi_cuda(seqlen_q):
    seqlens = [0, 15, 16, 300]
    k_cache, v_cache, table, _ = make_cache([s + seqlen_q for s in seqlens], 16, 2, 64, dtype=torch.float16,
                                            device="cuda")
    q = torch.randn(4, seqlen_q, 8, 64, dtype=torch.float16, device="cuda")
    k, v = torch.randn(2, 4, seqlen_q, 2, 64, dtype=torch.float16, device="cuda").unbind(0)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    check_cuda(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table, causal=True)
    check_cuda(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table, window_size=(30, 2),
               softcap=8.0, alibi_slopes=torch.rand(8, device="cuda"))


def test_contiguous_cache_cuda():
    k_cache, v_cache = torch.randn(2, 3, 200, 2, 128, dtype=torch.bfloat16, device="cuda").unbind(0)
    q = torch.randn(3, 1, 4, 128, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn(2, 3, 1, 2, 128, dtype=torch.bfloat16, device="cuda").unbind(0)
    check_cuda(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([0, 50, 199], dtype=torch.int32, device="cuda"))


def test_cache_writers_cuda():
    k_cache, v_cache = torch.randn(2, 6, 16, 2, 64, dtype=torch.float16, device="cuda").unbind(0)
    slots = torch.randperm(96, device="cuda")[:20]
    slots[::3] = -1
    key, value = torch.randn(2, 20, 2, 64, dtype=torch.float16, device="cuda").unbind(0)
    fast, ref = [k_cache.clone(), v_cache.clone()], [k_cache.clone(), v_cache.clone()]
    reshape_and_cache(key, value, *fast, slots)
    reshape_and_cache_ref(key, value, *ref, slots)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    mapping = torch.tensor([[0, 5], [2, 3]], device="cuda")
    copy_blocks(*fast, mapping)
    copy_blocks_ref(*ref, mapping)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
