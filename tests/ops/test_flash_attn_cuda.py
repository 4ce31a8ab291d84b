"""The CUDA flash-attention kernels (csrc/flash_attn/flash_*_kernel.cuh) against attention_ref.

Every test but the first is marked `cuda` and skipped where torch sees no GPU or fastdl was built without
CUDA (tests/conftest.py). Same correctness rule as test_flash_attn.py, whose helpers these tests reuse:
against a gold reference in fp32, the kernel's max error is at most 2x (3x for gradients) that of the
same reference computed in fp16/bf16.
"""

import pytest
import torch

import fastdl
from fastdl.ops.flash_attn import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func

from .test_flash_attn import assert_lse, assert_rule, check_against_ref, fast_and_ref, make_qkv, random_cu_seqlens

OPS = ("flash_attn_fwd", "flash_attn_varlen_fwd", "flash_attn_bwd", "flash_attn_varlen_bwd")
DTYPES = [torch.float16, torch.bfloat16]


def test_cuda_kernels_registered_iff_built_with_cuda():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdl::{op}", "CUDA") == fastdl.build_info()["cuda"]


def cuda_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, seed=0):
    return tuple(x.cuda() for x in make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, seed))


# Head dims: every compiled one (32, 64, ..., 256) and two that run zero-padded (40 -> 64, 200 -> 224).
HEADDIMS = [32, 40, 64, 96, 128, 160, 192, 200, 224, 256]
SEQLENS = [(1, 239), (113, 203), (128, 217), (256, 512), (203, 113), (108, 256), (1023, 1024)]


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_sweep(dtype, headdim, seqlen_q, seqlen_k, causal):
    # (203, 113) with causal leaves the first 90 query rows without keys.
    batch = 1 if seqlen_q * seqlen_k > 300_000 else 2
    q, k, v = cuda_qkv(batch, seqlen_q, seqlen_k, 4, 2, headdim, dtype)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nheads,nheads_k", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_gqa_mqa(nheads, nheads_k, causal, dtype):
    q, k, v = cuda_qkv(2, 157, 301, nheads, nheads_k, 128, dtype)
    check_against_ref(*fast_and_ref(causal=causal), (q, k, v), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("window_size", [(0, 0), (16, 0), (7, 31), (-1, 20), (40, -1), (300, 300)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (203, 113), (300, 300)])
def test_window(seqlen_q, seqlen_k, causal, window_size):
    q, k, v = cuda_qkv(2, seqlen_q, seqlen_k, 4, 2, 64, torch.bfloat16)
    check_against_ref(*fast_and_ref(causal=causal, window_size=window_size), (q, k, v), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("alibi", [None, "heads", "batch_heads"])
@pytest.mark.parametrize("softcap", [0.0, 1.5, 30.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_alibi(causal, softcap, alibi, dtype):
    batch, nheads = 2, 4
    q, k, v = make_qkv(batch, 129, 300, nheads, 2, 96, dtype)
    q = (q.float() * 2).to(dtype)  # scores ~N(0, 4): they reach the cap
    g = torch.Generator().manual_seed(1)
    slopes = {None: None, "heads": torch.rand(nheads, generator=g),
              "batch_heads": torch.rand(batch, nheads, generator=g)}[alibi]
    options = dict(causal=causal, softcap=softcap, alibi_slopes=None if slopes is None else slopes.cuda(),
                   window_size=(-1, -1) if causal else (90, 50))
    check_against_ref(*fast_and_ref(**options), (q.cuda(), k.cuda(), v.cuda()), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("softmax_scale", [0.37, -0.2])
def test_softmax_scale(softmax_scale):
    # A negative scale flips which key has the largest score: the kernel scales before taking the max.
    q, k, v = cuda_qkv(2, 77, 91, 2, 2, 32, torch.float16)
    check_against_ref(*fast_and_ref(softmax_scale=softmax_scale, causal=True), (q, k, v), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window_size=(32, 0)),
                                     dict(softcap=2.0, alibi="batch_heads")], ids=["full", "causal", "window",
                                                                                    "softcap_alibi"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_varlen(headdim, options, dtype):
    g = torch.Generator().manual_seed(2)
    batch, nheads, nheads_k = 5, 4, 2
    lens_q = torch.randint(1, 300, (batch,), generator=g).tolist()
    lens_k = torch.randint(1, 300, (batch,), generator=g).tolist()
    lens_k[1] = 0  # a sequence without keys: its queries output 0, lse +inf
    lens_q[3] = 0  # and one without queries
    cu_q, cu_k = random_cu_seqlens(lens_q).cuda(), random_cu_seqlens(lens_k).cuda()
    q = torch.randn(sum(lens_q), nheads, headdim, generator=g).to(dtype).cuda()
    k = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype).cuda()
    v = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype).cuda()
    options = dict(options)
    if options.pop("alibi", None):
        options["alibi_slopes"] = torch.rand(batch, nheads, generator=g).cuda()
    args = (cu_q, cu_k, max(lens_q) + 5, max(lens_k))  # max_seqlen may exceed the longest sequence

    def fast(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True, **options)
        return out, lse

    def ref(q, k, v, upcast):
        out, lse, _ = attention_varlen_ref(q, k, v, *args, return_attn_probs=True, upcast=upcast, **options)
        return out, lse

    check_against_ref(fast, ref, (q, k, v), dtype)


def check_views(views, dtype, **options):
    """The 2x / 3x rule for inputs that are views of other tensors. check_against_ref clones its inputs,
    which makes non-dense views contiguous; here the kernel gets the views themselves (gradients flow
    back through them), and the references get contiguous copies."""
    out, lse, _ = flash_attn_func(*views, return_attn_probs=True, **options)
    gold_in = [x.detach().float().requires_grad_() for x in views]
    ref_in = [x.detach().contiguous().requires_grad_() for x in views]
    gold_out, gold_lse, _ = attention_ref(*gold_in, return_attn_probs=True, **options)
    ref_out = attention_ref(*ref_in, upcast=False, **options)
    assert_rule("out", out, gold_out, ref_out, 2)
    assert_lse(lse, gold_lse)
    dout = torch.randn_like(out)
    grads = [torch.autograd.grad(o, x, d) for o, x, d in ((out, views, dout), (gold_out, gold_in, dout.float()),
                                                             (ref_out, ref_in, dout))]
    scale = max(g.abs().max().item() for g in grads[1])
    for name, f, g, r in zip(("dq", "dk", "dv"), *grads):
        assert_rule(name, f, g, r, 3, scale)


@pytest.mark.cuda
def test_noncontiguous_and_misaligned():
    batch, seqlen, nheads, nheads_k, headdim = 2, 150, 4, 2, 64
    g = torch.Generator().manual_seed(3)
    dt = torch.float16

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dt).cuda().requires_grad_()

    q = leaf(batch, nheads, seqlen, headdim).transpose(1, 2)  # heads-major
    k = leaf(batch, seqlen, nheads_k, headdim + 24)[..., 8:8 + headdim]  # padded rows
    v = leaf(batch, 2 * seqlen, nheads_k, headdim)[:, ::2]  # every other row
    check_views((q, k, v), dt, causal=True)
    # Rows that are not 16-byte aligned (data pointer 2 bytes off; odd row and head strides): the binding
    # copies them before the kernels run.
    q_off = leaf(batch * seqlen * nheads * headdim + 1)[1:].view(batch, seqlen, nheads, headdim)
    k_odd = leaf(batch, seqlen, nheads_k, headdim + 1)[..., :headdim]
    assert q_off.data_ptr() % 16 != 0 and k_odd.stride(1) % 8 != 0
    check_views((q_off, k_odd, v), dt)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_fully_masked_rows(dtype):
    # causal with seqlen_q > seqlen_k: query i sees keys j <= i - 4, so rows 0..3 see nothing.
    q, k, v = cuda_qkv(1, 8, 4, 2, 1, 64, dtype)
    q.requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isinf(lse[..., :4]).all() and (lse[..., :4] > 0).all()
    assert torch.isfinite(lse[..., 4:]).all()
    (out.float().sum() + lse[..., 4:].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :4], torch.zeros_like(q.grad[:, :4]))
    # A whole 128-row block without keys (the kernel's early exit), a window that excludes every key,
    # and seqlen_k = 0.
    q2, k2, v2 = cuda_qkv(1, 300, 40, 2, 2, 64, dtype)
    out, lse, _ = flash_attn_func(q2, k2, v2, causal=True, return_attn_probs=True)
    assert torch.equal(out[:, :260], torch.zeros_like(out[:, :260])) and torch.isinf(lse[..., :260]).all()
    out = flash_attn_func(q.detach(), k, v, window_size=(-1, 0), causal=False)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    out, lse, _ = flash_attn_func(q.detach(), k[:, :0], v[:, :0], return_attn_probs=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse > 0).all()


@pytest.mark.cuda
def test_lse_gradient():
    # A loss on softmax_lse reaches the scores as dlse * P (D = rowsum(dO * O) - dlse in the kernel).
    q, k, v = cuda_qkv(2, 90, 70, 4, 2, 64, torch.bfloat16)

    def fast(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out, lse

    def ref(q, k, v, upcast):
        out, lse, _ = attention_ref(q, k, v, causal=True, return_attn_probs=True, upcast=upcast)
        return out, lse

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gold_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    (out, lse), (gold_out, gold_lse), (ref_out, ref_lse) = fast(*leaves), ref(*gold_in, True), ref(*ref_in, False)
    seen = torch.isfinite(gold_lse)  # causal with seqlen_q > seqlen_k: the first rows see no key
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = [torch.autograd.grad((o, torch.where(seen, l, 0)), x, (do, dlse))
             for o, l, x, do in ((out, lse, leaves, dout), (gold_out, gold_lse, gold_in, dout.float()),
                                 (ref_out, ref_lse, ref_in, dout))]
    scale = max(g.abs().max().item() for g in grads[1])
    for f, g, r in zip(*grads):
        err = (f.float() - g).abs().max().item()
        assert err <= 3 * (r.float() - g).abs().max().item() + 16 * torch.finfo(torch.float32).eps * scale


@pytest.mark.cuda
@pytest.mark.parametrize("nheads_k", [1, 4])
def test_backward_deterministic(nheads_k):
    # The backward has no atomics: dQ comes from its own pass, dK/dV sum the GQA group in registers.
    q, k, v = cuda_qkv(1, 700, 700, 4, nheads_k, 64, torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, leaves, dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.cuda
def test_opcheck():
    g = torch.Generator().manual_seed(7)
    dt = torch.float16
    q = torch.randn(2, 9, 4, 16, generator=g).to(dt).cuda().requires_grad_()
    k = torch.randn(2, 13, 2, 16, generator=g).to(dt).cuda().requires_grad_()
    v = torch.randn(2, 13, 2, 16, generator=g).to(dt).cuda().requires_grad_()
    slopes = torch.rand(4, generator=g).cuda()
    args = (q, k, v, 0.25, True, -1, -1, 0.0, slopes)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_fwd.default, args)
    out, lse = torch.ops.fastdl.flash_attn_fwd(*args)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None,
                           0.25, True, -1, -1, 0.0, slopes))
    cu_q, cu_k = random_cu_seqlens([4, 5]).cuda(), random_cu_seqlens([6, 7]).cuda()
    qv = torch.randn(9, 4, 16, generator=g).to(dt).cuda().requires_grad_()
    kv = [torch.randn(13, 2, 16, generator=g).to(dt).cuda().requires_grad_() for _ in range(2)]
    vargs = (qv, *kv, cu_q, cu_k, 5, 7, 0.25, False, 3, 2, 5.0, None)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_varlen_fwd.default, vargs)
    out, lse = torch.ops.fastdl.flash_attn_varlen_fwd(*vargs)
    torch.library.opcheck(torch.ops.fastdl.flash_attn_varlen_bwd.default,
                          (torch.randn_like(out), qv.detach(), kv[0].detach(), kv[1].detach(), out.detach(),
                           lse.detach(), torch.randn_like(lse), cu_q, cu_k, 5, 7, 0.25, False, 3, 2, 5.0, None))


def _bad(dtype=torch.float16, headdim=64, **over):
    """Valid CUDA arguments for flash_attn_func with some replaced."""
    g = torch.Generator().manual_seed(8)
    args = dict(q=torch.randn(1, 4, 4, headdim, generator=g), k=torch.randn(1, 6, 2, headdim, generator=g),
                v=torch.randn(1, 6, 2, headdim, generator=g))
    args = {name: x.to(dtype).cuda() for name, x in args.items()}
    args.update(over)
    return args


BAD_INPUTS = {
    "fp32": (lambda: _bad(torch.float32), r"on CUDA, q must be float16 or bfloat16, got Float"),
    "headdim_not_multiple_of_8": (lambda: _bad(headdim=36), r"on CUDA, headdim must be a multiple of 8 .* got 36"),
    "headdim_too_large": (lambda: _bad(headdim=264), r"headdim must be in \[1, 256\], got 264"),
    "k_on_cpu": (lambda: _bad(k=torch.randn(1, 6, 2, 64, dtype=torch.float16)), "k must be on the device of q"),
    "v_dtype": (lambda: _bad(v=torch.randn(1, 6, 2, 64, dtype=torch.bfloat16, device="cuda")),
                "v must have the dtype of q"),
    "last_dim": (lambda: _bad(q=torch.randn(1, 4, 4, 64, 2, dtype=torch.float16, device="cuda")[..., 0]),
                 "q must have a contiguous last"),
    "alibi_dtype": (lambda: _bad(alibi_slopes=torch.rand(4, dtype=torch.float64, device="cuda")),
                    "alibi_slopes must have dtype"),
    "alibi_on_cpu": (lambda: _bad(alibi_slopes=torch.rand(4)), "alibi_slopes must be on the device of q"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        flash_attn_func(**make())


@pytest.mark.cuda
def test_bad_varlen_inputs():
    q = torch.randn(7, 2, 64, dtype=torch.float16, device="cuda")
    k = torch.randn(9, 2, 64, dtype=torch.float16, device="cuda")
    cu_q, cu_k = random_cu_seqlens([3, 4]), random_cu_seqlens([4, 5])
    with pytest.raises((RuntimeError, ValueError), match="cu_seqlens_q must be on the device of q"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k.cuda(), 4, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be int32"):
        flash_attn_varlen_func(q, k, k, cu_q.cuda(), cu_k.long().cuda(), 4, 5)
