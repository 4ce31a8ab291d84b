"""fastdl flash attention against attention_ref.

Correctness rule (flash-attention's tests/test_flash_attn.py): against a gold reference computed in higher
precision (fp64 for fp32 inputs, fp32 for bf16/fp16), fastdl's max error must be at most 2x (3x for
gradients) the error of the same reference computed in the input dtype, plus a small floor (see FLOOR_ULPS).
"""

import pytest
import torch

import fastdl
from fastdl.ops.flash_attn import (
    attention_ref,
    attention_varlen_ref,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

# Both errors are max-abs over a tensor. Where the input-dtype reference happens to be nearly exact (one
# softmax row at seqlen_q = 1, outputs of zero for fully masked rows) twice its error is ~0, while the
# kernel's different but equally valid summation order (tiles, the online-softmax rescaling, a 20-ulp exp)
# still leaves a few ulps. The floor is a few fp32 ulps of the tensor's scale: 4 ulps of max(1, |out|)
# for the output (~5e-7), and 16 ulps of max(1, |dq|, |dk|, |dv|) for each gradient. The gradients share
# dS = P * (dP - D), which subtracts two dot products of size ~|dO| |V| computed in different orders, so a
# gradient that cancels to 0 (a window of one key) keeps the rounding of the others' scale. Real bugs (a
# wrong mask, scale or tile) give errors of 1e-2 and up.
FLOOR_ULPS = {"out": 4, "grad": 16}


def gold_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def assert_rule(name, fast, gold, ref, factor, scale=None):
    gold = gold.double()
    err = (fast.double() - gold).abs().max().item()
    ref_err = (ref.double() - gold).abs().max().item()
    scale = gold.abs().max().item() if scale is None else scale
    floor = FLOOR_ULPS["out" if name == "out" else "grad"] * torch.finfo(torch.float32).eps * max(1.0, scale)
    assert err <= factor * ref_err + floor, (
        f"{name}: error {err:.3e} > {factor} x reference error {ref_err:.3e} + {floor:.1e}")


def assert_lse(fast, gold):
    """softmax_lse: +inf exactly where a row sees no key, close elsewhere (lse is O(log seqlen))."""
    gold = gold.double()
    inf = torch.isinf(gold)
    assert torch.equal(torch.isinf(fast), inf) and bool((fast[inf] > 0).all())
    tol = 1e-5 if fast.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fast.double()[~inf], gold[~inf], atol=tol, rtol=tol)


def check_against_ref(fast_fn, ref_fn, inputs, dtype, grads=True):
    """fast_fn / ref_fn(*inputs, upcast=...) -> (out, lse); checks out, lse and the input gradients."""
    leaves = [x.detach().clone().requires_grad_(grads) for x in inputs]
    out, lse = fast_fn(*leaves)
    gold_in = [x.detach().to(gold_dtype(dtype)).requires_grad_(grads) for x in inputs]
    gold_out, gold_lse = ref_fn(*gold_in, upcast=True)
    ref_in = [x.detach().clone().requires_grad_(grads) for x in inputs]
    ref_out, _ = ref_fn(*ref_in, upcast=False)
    assert out.dtype == dtype and out.shape == gold_out.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rule("out", out, gold_out, ref_out, 2)
    assert_lse(lse, gold_lse)
    if not grads:
        return
    dout = torch.randn_like(out)
    fast_g = torch.autograd.grad(out, leaves, dout)
    gold_g = torch.autograd.grad(gold_out, gold_in, dout.to(gold_out.dtype))
    ref_g = torch.autograd.grad(ref_out, ref_in, dout)
    scale = max(g.abs().max().item() for g in gold_g)
    for name, f, g, r in zip(("dq", "dk", "dv"), fast_g, gold_g, ref_g):
        assert torch.isfinite(f).all(), f"{name} is not finite"
        assert_rule(name, f, g, r, 3, scale)


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, headdim, generator=g).to(dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=g).to(dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=g).to(dtype)
    return q, k, v


def fast_and_ref(**options):
    def fast(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **options)
        return out, lse

    def ref(q, k, v, upcast):
        out, lse, _ = attention_ref(q, k, v, return_attn_probs=True, upcast=upcast, **options)
        return out, lse

    return fast, ref


SEQLENS = [(1, 239), (113, 203), (128, 217), (256, 512), (203, 113), (108, 256), (1023, 1024)]
HEADDIMS = [32, 40, 64, 96, 128, 256]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("headdim", HEADDIMS)
def test_fp32_sweep(headdim, seqlen_q, seqlen_k, causal):
    # (203, 113) with causal leaves the first 90 query rows without keys.
    batch, nheads = (1, 2) if seqlen_q * seqlen_k > 300_000 else (2, 2)
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads, headdim, torch.float32)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nheads,nheads_k", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_gqa_mqa(nheads, nheads_k, causal, dtype):
    q, k, v = make_qkv(2, 157, 301, nheads, nheads_k, 64, dtype)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (1, 239), (256, 512), (1023, 1024)])
@pytest.mark.parametrize("headdim", [64, 128])
def test_bf16(headdim, seqlen_q, seqlen_k, causal):
    batch = 1 if seqlen_q > 512 else 2
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, 4, 2, headdim, torch.bfloat16)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_fp16(causal):
    # fp16 shares bf16's path (tiles converted to fp32 as they load).
    q, k, v = make_qkv(2, 113, 203, 4, 2, 96, torch.float16)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), torch.float16)


@pytest.mark.parametrize("window_size", [(0, 0), (16, 0), (7, 31), (-1, 20), (40, -1), (300, 300)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (203, 113)])
def test_window(seqlen_q, seqlen_k, causal, window_size):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 40, torch.float32)
    check_against_ref(*fast_and_ref(causal=causal, window_size=window_size), (q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap,alibi", [(1.5, None), (30.0, None), (0.0, "heads"), (0.0, "batch_heads"),
                                           (1.5, "batch_heads")])
def test_softcap_alibi(softcap, alibi, causal, dtype):
    batch, nheads = 2, 4
    q, k, v = make_qkv(batch, 129, 300, nheads, 2, 96, dtype)
    # Scale q up so that scores reach the cap (softmax_scale * q.k is ~N(0, 4) here).
    q = (q.float() * 2).to(dtype)
    g = torch.Generator().manual_seed(1)
    slopes = {None: None, "heads": torch.rand(nheads, generator=g),
              "batch_heads": torch.rand(batch, nheads, generator=g)}[alibi]
    window_size = (-1, -1) if causal else (90, 50)
    options = dict(causal=causal, softcap=softcap, alibi_slopes=slopes, window_size=window_size)
    check_against_ref(*fast_and_ref(**options), (q, k, v), dtype)


DECODE_OPTIONS = {
    "causal": dict(causal=True),
    "window": dict(window_size=(100, 0)),
    "softcap_alibi": dict(softcap=3.0, alibi=True),
}


@pytest.mark.parametrize("seqlen_q,seqlen_k,nheads_k", [(1, 300, 8), (1, 300, 2), (2, 300, 4), (3, 300, 8),
                                                        (3, 1, 8)])
@pytest.mark.parametrize("options", list(DECODE_OPTIONS.values()), ids=list(DECODE_OPTIONS))
def test_decode(options, seqlen_q, seqlen_k, nheads_k):
    # At most 8 query rows per kv-head take the row-by-row forward (no packing); (3, 1) causal leaves
    # two rows without keys. (test_bf16's seqlen_q = 1 case runs this path in bf16.)
    nheads, dtype = 8, torch.float32
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, 64, dtype)
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(2, nheads, generator=torch.Generator().manual_seed(10))
    check_against_ref(*fast_and_ref(**options), (q, k, v), dtype)


def test_decode_varlen():
    cu_q, cu_k = random_cu_seqlens([1, 0, 1]), random_cu_seqlens([50, 7, 0])
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 32, generator=g)
    k, v = torch.randn(57, 2, 32, generator=g), torch.randn(57, 2, 32, generator=g)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 50, causal=True, return_attn_probs=True)
    ref, ref_lse, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, 1, 50, causal=True, return_attn_probs=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[:, 1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(lse[:, 0], ref_lse[:, 0], atol=1e-5, rtol=1e-5)


def test_softmax_scale():
    q, k, v = make_qkv(2, 77, 91, 2, 2, 32, torch.float32)
    check_against_ref(*fast_and_ref(softmax_scale=0.37, causal=True), (q, k, v), torch.float32)


def random_cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window_size=(32, 0)),
                                     dict(softcap=2.0, alibi="batch_heads")], ids=["full", "causal", "window",
                                                                                    "softcap_alibi"])
def test_varlen(options, dtype):
    g = torch.Generator().manual_seed(2)
    batch, nheads, nheads_k, headdim = 5, 4, 2, 64
    lens_q = torch.randint(1, 300, (batch,), generator=g).tolist()
    lens_k = torch.randint(1, 300, (batch,), generator=g).tolist()
    lens_k[1] = 0  # a sequence without keys: its queries output 0, lse +inf
    lens_q[3] = 0  # and one without queries
    cu_q, cu_k = random_cu_seqlens(lens_q), random_cu_seqlens(lens_k)
    q = torch.randn(sum(lens_q), nheads, headdim, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype)
    options = dict(options)
    if options.pop("alibi", None):
        options["alibi_slopes"] = torch.rand(batch, nheads, generator=g)
    # max_seqlen may exceed the longest sequence (FA2 callers often pass a bound).
    args = (cu_q, cu_k, max(lens_q) + 5, max(lens_k))

    def fast(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True, **options)
        return out, lse

    def ref(q, k, v, upcast):
        out, lse, _ = attention_varlen_ref(q, k, v, *args, return_attn_probs=True, upcast=upcast, **options)
        return out, lse

    check_against_ref(fast, ref, (q, k, v), dtype)


def test_noncontiguous():
    batch, seqlen, nheads, nheads_k, headdim = 2, 150, 4, 2, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, nheads, seqlen, headdim, generator=g).transpose(1, 2)  # heads-major storage
    k = torch.randn(batch, seqlen, nheads_k, headdim + 24, generator=g)[..., 8:8 + headdim]  # padded rows
    v = torch.randn(batch, 2 * seqlen, nheads_k, headdim, generator=g)[:, ::2]  # every other row
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_ref(*fast_and_ref(causal=True), (q, k, v), torch.float32)
    # Broadcast (stride-0) keys are accepted too.
    k0 = torch.randn(batch, 1, nheads_k, headdim, generator=g).expand(batch, seqlen, nheads_k, headdim)
    out = flash_attn_func(q, k0, v, causal=True)
    torch.testing.assert_close(out, attention_ref(q, k0.contiguous(), v, causal=True), atol=1e-5, rtol=1e-5)


def test_packed_variants():
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 100, 3, 4, 32, generator=g, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()

    q = torch.randn(2, 60, 4, 32, generator=g)
    kv = torch.randn(2, 100, 2, 2, 32, generator=g)
    out = flash_attn_kvpacked_func(q, kv, window_size=(10, 10))
    torch.testing.assert_close(out, attention_ref(q, kv[:, :, 0], kv[:, :, 1], window_size=(10, 10)),
                               atol=1e-5, rtol=1e-5)

    cu = random_cu_seqlens([30, 70])
    qkv = torch.randn(100, 3, 4, 32, generator=g)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 70, causal=True)
    q, k, v = qkv.unbind(1)
    torch.testing.assert_close(out, attention_varlen_ref(q, k, v, cu, cu, 70, 70, causal=True),
                               atol=1e-5, rtol=1e-5)
    kv = torch.randn(100, 2, 2, 32, generator=g)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 70, 70)
    torch.testing.assert_close(out, attention_varlen_ref(q, kv[:, 0], kv[:, 1], cu, cu, 70, 70),
                               atol=1e-5, rtol=1e-5)


def test_fully_masked_rows():
    # causal with seqlen_q > seqlen_k: query i sees keys j <= i - 4, so rows 0..3 see nothing.
    q, k, v = make_qkv(1, 8, 4, 2, 1, 16, torch.float32)
    q.requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isinf(lse[..., :4]).all() and (lse[..., :4] > 0).all()
    assert torch.isfinite(lse[..., 4:]).all()
    (out.sum() + lse[..., 4:].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :4], torch.zeros_like(q.grad[:, :4]))
    # A window that excludes every key, and seqlen_k = 0.
    out = flash_attn_func(q, k, v, window_size=(-1, 0), causal=False)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    k0, v0 = k[:, :0], v[:, :0]
    out, lse, _ = flash_attn_func(q, k0, v0, return_attn_probs=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


@pytest.mark.parametrize("nheads_k", [1, 4])
def test_backward_deterministic(nheads_k):
    # One (sequence, kv-head) pair with MQA splits the key blocks across threads (per-split dQ buffers).
    q, k, v = make_qkv(1, 700, 700, 4, nheads_k, 64, torch.float32)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, leaves, dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    check_against_ref(*fast_and_ref(causal=True), (q, k, v), torch.float32)


GRADCHECK_OPTIONS = {
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="heads", causal=True),
    "all": dict(causal=True, softcap=2.0, alibi="batch"),
}


@pytest.mark.parametrize("options", list(GRADCHECK_OPTIONS.values()), ids=list(GRADCHECK_OPTIONS))
def test_gradcheck(options):
    g = torch.Generator().manual_seed(5)
    batch, nheads = 2, 4
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi:
        shape = (nheads,) if alibi == "heads" else (batch, nheads)
        options["alibi_slopes"] = torch.rand(*shape, generator=g)
    q = torch.randn(batch, 5, nheads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, 7, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, 7, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):  # out and softmax_lse (every row sees a key, so lse is finite)
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **options)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_varlen():
    g = torch.Generator().manual_seed(6)
    cu_q, cu_k = random_cu_seqlens([3, 6]), random_cu_seqlens([5, 4])
    q = torch.randn(9, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 5, causal=True, window_size=(3, -1))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 9, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 13, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 13, 2, 16, generator=g, requires_grad=True)
    slopes = torch.rand(4, generator=g)
    args = (q, k, v, 0.25, True, -1, -1, 0.0, slopes)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_fwd.default, args)
    out, lse = torch.ops.fastdl.flash_attn_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, 0.25,
                           True, -1, -1, 0.0, slopes))

    cu_q, cu_k = random_cu_seqlens([4, 5]), random_cu_seqlens([6, 7])
    qv = torch.randn(9, 4, 16, generator=g, requires_grad=True)
    kv_ = [torch.randn(13, 2, 16, generator=g, requires_grad=True) for _ in range(2)]
    vargs = (qv, *kv_, cu_q, cu_k, 5, 7, 0.25, False, 3, 2, 5.0, None)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_varlen_fwd.default, vargs)
    out, lse = torch.ops.fastdl.flash_attn_varlen_fwd(*vargs)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_varlen_bwd.default,
                          (torch.randn_like(out), qv.detach(), kv_[0].detach(), kv_[1].detach(), out.detach(),
                           lse.detach(), torch.randn_like(lse), cu_q, cu_k, 5, 7, 0.25, False, 3, 2, 5.0,
                           None))


def test_compile_fullgraph():
    def attn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, softcap=5.0, return_attn_probs=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(attn, fullgraph=True, dynamic=False)
    q, k, v = make_qkv(2, 33, 47, 4, 2, 32, torch.float32)
    eager_in = [x.clone().requires_grad_() for x in (q, k, v)]
    comp_in = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = attn(*eager_in)
    eager.backward()
    comp = compiled(*comp_in)
    comp.backward()
    torch.testing.assert_close(comp, eager)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_public_exports():
    assert fastdl.flash_attn_func is flash_attn_func
    assert fastdl.flash_attn_varlen_func is flash_attn_varlen_func


def _bad(**over):
    """Valid arguments for flash_attn_func with some replaced."""
    g = torch.Generator().manual_seed(8)
    args = dict(q=torch.randn(1, 4, 4, 8, generator=g), k=torch.randn(1, 6, 2, 8, generator=g),
                v=torch.randn(1, 6, 2, 8, generator=g))
    args.update(over)
    return args


def _varlen(**over):
    g = torch.Generator().manual_seed(9)
    args = dict(q=torch.randn(7, 2, 8, generator=g), k=torch.randn(9, 2, 8, generator=g),
                v=torch.randn(9, 2, 8, generator=g), cu_seqlens_q=random_cu_seqlens([3, 4]),
                cu_seqlens_k=random_cu_seqlens([4, 5]), max_seqlen_q=4, max_seqlen_k=5)
    args.update(over)
    return args


BAD_INPUTS = {  # case: (function, arguments, expected message)
    "dtype": (flash_attn_func, _bad(k=torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)),
              "k must have the dtype of q"),
    "device": (flash_attn_func, _bad(v=torch.randn(1, 6, 2, 8, device="meta")),
               "v must be on the device of q"),
    "int_dtype": (flash_attn_func, _bad(q=torch.ones(1, 4, 4, 8, dtype=torch.int32)), "q must be float32"),
    "heads": (flash_attn_func, _bad(q=torch.randn(1, 4, 3, 8)), r"nheads of q \(3\) must be a multiple"),
    "headdim": (flash_attn_func,
                _bad(q=torch.randn(1, 4, 4, 264), k=torch.randn(1, 6, 2, 264), v=torch.randn(1, 6, 2, 264)),
                r"headdim must be in \[1, 256\], got 264"),
    "headdim_k": (flash_attn_func, _bad(k=torch.randn(1, 6, 2, 16)), "k must have the headdim of q"),
    "v_shape": (flash_attn_func, _bad(v=torch.randn(1, 5, 2, 8)), "v must have shape"),
    "batch": (flash_attn_func, _bad(k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 2, 8)),
              "k must have the batch"),
    "rank": (flash_attn_func, _bad(q=torch.randn(4, 4, 8)), r"q must be \(batch, seqlen, nheads, headdim\)"),
    "last_dim": (flash_attn_func, _bad(q=torch.randn(1, 4, 4, 8, 2)[..., 0]),
                 "q must have a contiguous last"),
    "window": (flash_attn_func, _bad(window_size=(-2, 0)), "window_size entries must be >= 0, or -1"),
    "softcap": (flash_attn_func, _bad(softcap=-1.0), "softcap must be >= 0"),
    "alibi_shape": (flash_attn_func, _bad(alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
    "alibi_dtype": (flash_attn_func, _bad(alibi_slopes=torch.rand(4, dtype=torch.float64)),
                    "alibi_slopes must have dtype"),
    "dropout": (flash_attn_func, _bad(dropout_p=0.1), "does not implement dropout"),
    "cu_dtype": (flash_attn_varlen_func, _varlen(cu_seqlens_q=torch.tensor([0, 3, 7])),
                 "cu_seqlens_q must be int32"),
    "cu_order": (flash_attn_varlen_func,
                 _varlen(cu_seqlens_k=torch.tensor([0, 5, 4, 9], dtype=torch.int32),
                         cu_seqlens_q=torch.tensor([0, 3, 3, 7], dtype=torch.int32)),
                 "cu_seqlens_k must be non-decreasing"),
    "cu_length": (flash_attn_varlen_func,
                  _varlen(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32), max_seqlen_k=9),
                  "cu_seqlens_k must have the length of cu_seqlens_q"),
    "cu_total": (flash_attn_varlen_func, _varlen(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)),
                 r"cu_seqlens_q\[-1\] must equal the number of tokens \(7\)"),
    "cu_start": (flash_attn_varlen_func, _varlen(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)),
                 r"cu_seqlens_q\[0\] must be 0"),
    "max_seqlen": (flash_attn_varlen_func, _varlen(max_seqlen_k=4),
                   "sequence 1 has length 5 .* max_seqlen_k is 4"),
    "varlen_rank": (flash_attn_varlen_func, _varlen(q=torch.randn(1, 7, 2, 8)),
                    r"q must be \(total_tokens, nheads, headdim\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    fn, kwargs, message = BAD_INPUTS[case]
    expected = NotImplementedError if case == "dropout" else (RuntimeError, ValueError)
    with pytest.raises(expected, match=message):
        fn(**kwargs)


def test_bwd_op_checks_lse():
    q, k, v = make_qkv(1, 4, 6, 2, 2, 8, torch.float32)
    out, lse = torch.ops.fastdl.flash_attn_fwd(q, k, v, 0.3, False, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="softmax_lse must have shape"):
        torch.ops.fastdl.flash_attn_bwd(out, q, k, v, out, lse[:, :1], None, 0.3, False, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="softmax_lse must have dtype"):
        torch.ops.fastdl.flash_attn_bwd(out, q, k, v, out, lse.double(), None, 0.3, False, -1, -1, 0.0, None)


def test_reference_matches_sdpa():
    """attention_ref itself, against torch's SDPA where the two overlap (causal, seqlen_q == seqlen_k)."""
    q, k, v = make_qkv(2, 50, 50, 4, 4, 32, torch.float64)
    out = attention_ref(q, k, v, causal=True)
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (b, h, s, d)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    torch.testing.assert_close(out, sdpa.transpose(1, 2))
