"""fastdl paged attention (flash_attn_with_kvcache, reshape_and_cache, copy_blocks) against the references.

Attention tolerance is flash-attention's rule (see tests/ops/test_flash_attn.py): against a gold reference
in fp64, the kernel's max error is at most 2x the error of the reference computed in the input dtype, plus a
floor of a few fp32 ulps for where the input-dtype reference happens to be exact.
"""

import math

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

FLOOR_ULPS = 8


def make_cache(seqlens, block_size, nheads_k, headdim, dtype=torch.float32, spare_blocks=3, shared_prefix=0,
               device="cpu"):
    """A paged cache holding random keys/values for sequences of the given lengths, with a random (shuffled,
    non-contiguous) block table. The first `shared_prefix` blocks are shared by every sequence (a common
    prompt), as a BlockManager would after a prefix hit. Returns k_cache, v_cache, block_table, cache_seqlens."""
    batch = len(seqlens)
    blocks_per_seq = [-(-s // block_size) for s in seqlens]
    max_blocks = max(blocks_per_seq + [1]) + 1  # one spare column: entries past a sequence's end are unread
    own = [max(n - shared_prefix, 0) for n in blocks_per_seq]
    num_blocks = shared_prefix + sum(own) + spare_blocks
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    table = torch.full((batch, max_blocks), -1, dtype=torch.int32)  # -1 past the end: must not be read
    shared, nxt = perm[:shared_prefix], shared_prefix
    for b, n in enumerate(blocks_per_seq):
        k_shared = min(shared_prefix, n)
        table[b, :k_shared] = shared[:k_shared]
        table[b, k_shared:n] = perm[nxt:nxt + n - k_shared]
        nxt += n - k_shared
    k_cache = torch.randn(num_blocks, block_size, nheads_k, headdim, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, nheads_k, headdim, dtype=dtype, device=device)
    return k_cache, v_cache, table.to(device), torch.tensor(seqlens, dtype=torch.int32, device=device)


def assert_rule(fast, gold, ref, factor=2.0):
    gold = gold.double()
    err = (fast.double() - gold).abs().max().item() if fast.numel() else 0.0
    ref_err = (ref.double() - gold).abs().max().item() if ref.numel() else 0.0
    floor = FLOOR_ULPS * torch.finfo(torch.float32).eps * max(1.0, gold.abs().max().item() if gold.numel() else 1.0)
    assert err <= factor * ref_err + floor, f"error {err:.3e} > {factor} x reference error {ref_err:.3e} + {floor:.1e}"


def assert_lse(fast, gold):
    gold = gold.double()
    inf = torch.isinf(gold)
    assert torch.equal(torch.isinf(fast), inf) and bool((fast[inf] > 0).all())
    torch.testing.assert_close(fast.double()[~inf], gold[~inf], atol=2e-5, rtol=2e-5)


def check(q, k_cache, v_cache, k=None, v=None, **kw):
    """Runs the kernel and the references on clones of the caches; checks out, lse and the caches after the
    append. Returns the kernel's output."""
    caches = [c.clone() for c in (k_cache, v_cache)]
    out, lse = flash_attn_with_kvcache(q, caches[0], caches[1], k, v, return_softmax_lse=True, **kw)
    gold_caches = [c.double() for c in (k_cache, v_cache)]
    as64 = [None if x is None else x.double() for x in (q, k, v)]
    gold, gold_lse = flash_attn_with_kvcache_ref(as64[0], *gold_caches, as64[1], as64[2], return_softmax_lse=True,
                                                 **kw)
    ref_caches = [c.clone() for c in (k_cache, v_cache)]
    ref = flash_attn_with_kvcache_ref(q, *ref_caches, k, v, upcast=False, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_rule(out, gold, ref)
    assert_lse(lse, gold_lse)
    if k is not None:  # the append wrote exactly what the reference wrote, nothing else
        assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    return out


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("headdim", [64, 128])
def test_decode(block_size, group, headdim):
    # Lengths 1, exactly one and three blocks, odd, and long enough to span several softmax spans.
    seqlens = [1, block_size, 3 * block_size, 37, 600]
    nheads_k = 2
    k_cache, v_cache, table, cache_seqlens = make_cache(seqlens, block_size, nheads_k, headdim, shared_prefix=1)
    q = torch.randn(len(seqlens), 1, nheads_k * group, headdim)
    check(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 16])
def test_split_k(group, num_splits):
    """Flash-decoding: every split count gives the same attention (0: the kernel's choice, which splits a long
    batch-1 context across the threads); splits may be empty for the short sequence."""
    k_cache, v_cache, table, cache_seqlens = make_cache([1500, 9], 16, 2, 64)
    q = torch.randn(2, 1, 2 * group, 64)
    check(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table, num_splits=num_splits)


@pytest.mark.parametrize("seqlen_q", [1, 3, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_append_and_prefill(seqlen_q, causal):
    """New k/v appended at cache_seqlens (across a block boundary), then causal attention bottom-right
    aligned: a prefill over a cache that already holds a prefix, and a multi-token decode."""
    block_size, nheads_k, group, d = 16, 2, 4, 64
    seqlens = [0, 15, 16, 50]
    k_cache, v_cache, table, cache_seqlens = make_cache([s + seqlen_q for s in seqlens], block_size, nheads_k, d)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(len(seqlens), seqlen_q, nheads_k * group, d)
    k, v = torch.randn(2, len(seqlens), seqlen_q, nheads_k, d).unbind(0)
    check(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table, causal=causal)


@pytest.mark.parametrize("window", [(-1, -1), (20, 0), (5, 3), (0, 0)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("alibi", [False, True])
def test_window_softcap_alibi(window, softcap, alibi):
    k_cache, v_cache, table, cache_seqlens = make_cache([7, 33, 300], 8, 2, 64)
    q = torch.randn(3, 4, 8, 64)
    slopes = torch.rand(3, 8) if alibi else None
    check(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table, window_size=window, softcap=softcap,
          alibi_slopes=slopes, causal=window == (20, 0))


def test_contiguous_cache_append():
    """No block table: k_cache is (batch, seqlen_cache, nheads_k, headdim); cache_seqlens as an int."""
    k_cache, v_cache = torch.randn(2, 3, 70, 2, 64).unbind(0)
    q = torch.randn(3, 2, 4, 64)
    k, v = torch.randn(2, 3, 2, 2, 64).unbind(0)
    check(q, k_cache, v_cache, k, v, cache_seqlens=41, causal=True)
    check(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 1, 70], dtype=torch.int32))


def test_strided_inputs():
    """q a slice of a fused qkv projection, caches views of one (num_blocks, block_size, 2, nheads_k, d) tensor."""
    k_cache, v_cache, table, cache_seqlens = make_cache([20, 45], 16, 2, 64)
    kv = torch.stack([k_cache, v_cache], dim=2)  # (num_blocks, block_size, 2, nheads_k, d)
    qkv = torch.randn(2, 1, 3 * 4, 64)
    check(qkv[:, :, :4], kv[:, :, 0], kv[:, :, 1], cache_seqlens=cache_seqlens, block_table=table)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    k_cache, v_cache, table, cache_seqlens = make_cache([1, 16, 333], 16, 2, 128, dtype=dtype)
    q = torch.randn(3, 2, 8, 128, dtype=dtype)
    k, v = torch.randn(2, 3, 2, 2, 128, dtype=dtype).unbind(0)
    check(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens - 2 + 2 * (cache_seqlens < 2).int(),
          block_table=table, causal=True, softcap=10.0)


def test_empty():
    """An empty cache (no key: out 0, lse +inf) and an empty batch."""
    k_cache, v_cache, table, _ = make_cache([16], 16, 1, 64)
    q = torch.randn(1, 1, 2, 64)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, block_table=table,
                                       return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())
    out = flash_attn_with_kvcache(q[:0], k_cache, v_cache, cache_seqlens=torch.zeros(0, dtype=torch.int32),
                                  block_table=table[:0])
    assert out.shape == (0, 1, 2, 64)


# ---- cache writers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(dtype):
    num_blocks, block_size, nheads_k, d, tokens = 6, 8, 3, 64, 20
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, nheads_k, d).to(dtype).unbind(0)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[::4] = -1  # padding tokens: skipped
    key, value = torch.randn(2, tokens, nheads_k, d).to(dtype).unbind(0)
    fast = [k_cache.clone(), v_cache.clone()]
    ref = [k_cache.clone(), v_cache.clone()]
    reshape_and_cache(key, value, *fast, slots)
    reshape_and_cache_ref(key, value, *ref, slots)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    # Slots that were skipped or not named are untouched.
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert torch.equal(fast[0].flatten(0, 1)[~written], k_cache.flatten(0, 1)[~written])


def test_copy_blocks():
    k_cache, v_cache = torch.randn(2, 10, 16, 2, 32).unbind(0)
    # a strided cache too: every other block of a bigger one
    big = torch.randn(20, 16, 2, 32)
    for kc, vc in ((k_cache, v_cache), (big[::2], big[1::2])):
        mapping = torch.tensor([[0, 5], [3, 7], [3, 8], [9, 9]])
        fast = [kc.clone(), vc.clone()]
        ref = [kc.clone(), vc.clone()]
        copy_blocks(*fast, mapping)
        copy_blocks_ref(*ref, mapping)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


# ---- op contracts: opcheck and torch.compile -----------------------------------------------------------------


def test_opcheck():
    k_cache, v_cache, table, cache_seqlens = make_cache([5, 40], 8, 2, 32)
    table = table.clamp_min(0)  # opcheck may run the op on copies; entries past the end stay in range
    q = torch.randn(2, 1, 4, 32)
    k, v = torch.randn(2, 2, 1, 2, 32).unbind(0)
    args = (q, k_cache, v_cache, k, v, cache_seqlens, table, 0.125, True, -1, -1, 0.0, None, 0)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_with_kvcache.default, args)
    slots = torch.tensor([3, -1, 17])
    key, value = torch.randn(2, 3, 2, 32).unbind(0)
    torch.library.opcheck(torch.ops.fastdl.reshape_and_cache.default, (key, value, k_cache, v_cache, slots))
    torch.library.opcheck(torch.ops.fastdl.copy_blocks.default, (k_cache, v_cache, torch.tensor([[1, 4], [2, 6]])))


def test_compile_fullgraph():
    k_cache, v_cache, table, cache_seqlens = make_cache([10, 25], 8, 2, 32)
    cache_seqlens -= 1  # room for the appended token
    q = torch.randn(2, 1, 4, 32)
    k, v = torch.randn(2, 2, 1, 2, 32).unbind(0)

    def step(q, k_cache, v_cache, k, v, cache_seqlens, table, slots):
        reshape_and_cache(k[:, 0] * 2, v[:, 0] * 2, k_cache, v_cache, slots)
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=table)

    slots = torch.tensor([int(table[0, 0]) * 8 + 1, -1])
    eager = [k_cache.clone(), v_cache.clone()]
    compiled = [k_cache.clone(), v_cache.clone()]
    expected = step(q, *eager[:1], eager[1], k, v, cache_seqlens, table, slots)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *compiled, k, v, cache_seqlens, table, slots)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_input():
    k_cache, v_cache, table, cache_seqlens = make_cache([10, 20], 8, 2, 32)
    q = torch.randn(2, 1, 4, 32)
    kw = dict(cache_seqlens=cache_seqlens, block_table=table)

    bad = table.clone()
    bad[1, 0] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = \d+ is out of range for a cache of num_blocks"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=bad)
    too_long = torch.tensor([10, table.shape[1] * 8 + 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="more than the block table allows"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=too_long, block_table=table)
    with pytest.raises(RuntimeError, match="block_table must be int32, got Long"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table.long())
    with pytest.raises(RuntimeError, match="cache_seqlens must be int32, got Long"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens.long(), block_table=table)
    with pytest.raises(RuntimeError, match="k_cache must have the dtype of q"):
        flash_attn_with_kvcache(q.double(), k_cache, v_cache, **kw)
    with pytest.raises(RuntimeError, match="block_size .* must be a positive multiple of 8, got 12"):
        odd = torch.randn(k_cache.shape[0], 12, 2, 32)
        flash_attn_with_kvcache(q, odd, odd, **kw)
    with pytest.raises(RuntimeError, match=r"nheads of q \(3\) must be a multiple of nheads_k"):
        flash_attn_with_kvcache(q[:, :, :3], k_cache, v_cache, **kw)
    with pytest.raises(RuntimeError, match="k and v must be given together"):
        flash_attn_with_kvcache(q, k_cache, v_cache, torch.randn(2, 1, 2, 32), None, **kw)
    with pytest.raises(ValueError, match="block_table must be on the device of q"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table.to("meta"))

    key, value = torch.randn(2, 3, 2, 32).unbind(0)
    with pytest.raises(RuntimeError, match="slot_mapping must be int64, got Int"):
        reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = \d+ is out of range"):
        reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([0, 1, k_cache.shape[0] * 8]))
    with pytest.raises(RuntimeError, match=r"k_cache must have the dtype of key \(Float\), got Double"):
        reshape_and_cache(key, value, k_cache.double(), v_cache.double(), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"block_mapping\[0, 1\] = 99 is out of range"):
        copy_blocks(k_cache, v_cache, torch.tensor([[0, 99]]))
    with pytest.raises(RuntimeError, match="both a source and a destination"):
        copy_blocks(k_cache, v_cache, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(RuntimeError, match="block_mapping must be int64"):
        copy_blocks(k_cache, v_cache, torch.tensor([[0, 1]], dtype=torch.int32))


def test_reference_matches_dense_attention():
    """The reference itself: a paged cache holding the same keys as a contiguous one gives the same
    attention as fastdl's flash_attn_func on the contiguous keys (so the references are not vacuous)."""
    from fastdl.ops.flash_attn import attention_ref

    k_cache, v_cache, table, cache_seqlens = make_cache([24, 24], 8, 2, 32)
    q = torch.randn(2, 3, 4, 32)
    kd = torch.stack([k_cache[table[b, :3].long()].flatten(0, 1) for b in range(2)])
    vd = torch.stack([v_cache[table[b, :3].long()].flatten(0, 1) for b in range(2)])
    dense = attention_ref(q, kd, vd, causal=True)
    paged = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table, causal=True)
    torch.testing.assert_close(paged, dense, atol=1e-5, rtol=1e-5)
    assert not math.isnan(paged.sum().item())
