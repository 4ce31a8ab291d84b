"""rms_norm, rotary_emb and swiglu (fastdl.ops.fused_layers) against their pure-PyTorch references.

fp32 is compared with the reference run in fp64 on the same values; bf16 follows the low-precision rule: the
kernel's max error against the fp64 reference is at most 2x that of torch's composite run in bf16 (3x for
gradients).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdl.ops.fused_layers import rms_norm, rms_norm_ref, rotary_emb, rotary_emb_ref, swiglu, swiglu_ref

RTOL, ATOL = 1e-5, 1e-5


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(fn, args, diff, grad=None):
    """fn(*args) and the grads of <out, grad> w.r.t. args[i] for i in diff (detach keeps the strides)."""
    args = [a.detach().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    out = fn(*args)
    if grad is None:
        grad = torch.randn(out.shape, generator=gen(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * grad).sum(), [args[i] for i in diff])
    return out, grads, grad


def assert_matches_fp64(fn, ref, args, diff, rtol=RTOL, atol=ATOL):
    """fn on fp32 args against ref on the same values in fp64; outputs and grads in the args' dtypes."""
    out, grads, grad = run(fn, args, diff)
    ref_args = [a.double() if i in diff else a for i, a in enumerate(args)]
    ref_out, ref_grads, _ = run(ref, ref_args, diff, grad)
    assert out.dtype == args[0].dtype and out.shape == ref_out.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    for i, g, r in zip(diff, grads, ref_grads):
        assert g.dtype == args[i].dtype and g.shape == args[i].shape
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"grad {i}: {m}")


def assert_low_precision_rule(fn, composite, args64, diff, dtype=torch.bfloat16):
    """max|fn(args in dtype) - gold| <= 2 max|composite in dtype - gold| (3x for grads), gold the fp64
    composite on the dtype-rounded values."""
    low = [a.to(dtype) if i in diff else a for i, a in enumerate(args64)]
    gold_args = [a.double() if i in diff else a for i, a in enumerate(low)]
    gold, gold_grads, grad = run(composite, gold_args, diff)
    out, grads, _ = run(fn, low, diff, grad)
    base, base_grads, _ = run(composite, low, diff, grad)
    assert out.dtype == dtype
    err, base_err = (out.double() - gold).abs().max(), (base.double() - gold).abs().max()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
    for g, b, r in zip(grads, base_grads, gold_grads):
        err, base_err = (g.double() - r).abs().max(), (b.double() - r).abs().max()
        assert err <= 3 * base_err + 1e-6, (err, base_err)


# ---- rms_norm ----------------------------------------------------------------------------------------------


def rms_args(shape, nd=1, weight=True, dtype=torch.float32, seed=0):
    x = 2 * torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[len(shape) - nd:], generator=gen(seed + 7), dtype=torch.float64)).to(dtype)
    return x, list(shape[len(shape) - nd:]), (w if weight else None)


def rms_fn(fn, eps=1e-5):
    return lambda x, shape, w: fn(x, shape, w, eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 3, 130), (4, 257), (300, 16)])
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_matches_reference(shape, weight):
    x, ns, w = rms_args(shape, weight=weight)
    assert_matches_fp64(rms_fn(rms_norm), rms_fn(rms_norm_ref), [x, ns, w], [0, 2] if weight else [0])


def test_rms_norm_non_contiguous_and_multi_dim():
    base, ns, w = rms_args((6, 4, 40))
    # A strided row view (read in place) and a transposed input (last dim not contiguous: one copy).
    for x in (base[::2, :, :37], base.transpose(0, 1)):
        x_ns, x_w = [x.shape[-1]], w[: x.shape[-1]].contiguous()
        assert_matches_fp64(rms_fn(rms_norm), rms_fn(rms_norm_ref), [x, x_ns, x_w], [0, 2])
    x, ns, w = rms_args((3, 5, 7), nd=2)  # normalized over the last two dims
    assert_matches_fp64(rms_fn(rms_norm), rms_fn(rms_norm_ref), [x, ns, w], [0, 2])
    assert rms_norm(x, ns, w, None).shape == x.shape  # eps=None: finfo(x.dtype).eps, as torch
    torch.testing.assert_close(rms_norm(x, ns, w), F.rms_norm(x, ns, w))


def test_rms_norm_empty_and_fp64_exact():
    x, ns, w = rms_args((0, 12))
    out, grads, _ = run(rms_fn(rms_norm), [x, ns, w], [0, 2])
    assert out.shape == (0, 12) and grads[0].shape == (0, 12) and bool((grads[1] == 0).all())
    x, ns, w = rms_args((9, 45), dtype=torch.float64)
    out, grads, grad = run(rms_fn(rms_norm), [x, ns, w], [0, 2])
    ref, ref_grads, _ = run(rms_fn(rms_norm_ref), [x, ns, w], [0, 2], grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rms_norm_dweight_is_deterministic_across_threads():
    x, ns, w = rms_args((1000, 48))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(rms_fn(rms_norm), [x, ns, w], [0, 2])[1][1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_rms_norm_gradcheck_fp64():
    x, ns, w = rms_args((3, 2, 11), dtype=torch.float64)
    f = rms_fn(rms_norm, eps=1e-3)
    assert torch.autograd.gradcheck(lambda x, w: f(x, ns, w), (x.requires_grad_(), w.requires_grad_()))
    assert torch.autograd.gradcheck(lambda x: f(x, ns, None), (x,))


def test_rms_norm_bf16_rule():
    x, ns, w = rms_args((64, 200), dtype=torch.float64)
    assert_low_precision_rule(rms_fn(rms_norm), rms_fn(F.rms_norm), [x, ns, w], [0, 2])


def test_rms_norm_bad_input():
    x, ns, w = rms_args((4, 8))
    with pytest.raises(RuntimeError, match="weight must have shape normalized_shape"):
        rms_norm(x, ns, w[:5])
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        rms_norm(x, ns, w.double())
    with pytest.raises(RuntimeError, match="trailing dimensions must equal normalized_shape"):
        rms_norm(x, [5], None)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        rms_norm(x.int(), ns, None, 1e-5)


# ---- rotary_emb --------------------------------------------------------------------------------------------


def tables(seqlen, headdim, batch=None, seed=3, dtype=torch.float32):
    shape = (seqlen, headdim // 2) if batch is None else (batch, seqlen, headdim // 2)
    angles = 10 * torch.rand(shape, generator=gen(seed), dtype=torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 9, 3, 16), (3, 17, 5, 34), (2, 5, 2, 130), (1, 40, 4, 64)])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_rotary_matches_reference(shape, batched_tables):
    x = torch.randn(shape, generator=gen())
    cos, sin = tables(shape[1], shape[3], shape[0] if batched_tables else None)
    assert_matches_fp64(rotary_emb, rotary_emb_ref, [x, cos, sin], [0])


def test_rotary_takes_strided_qkv_views():
    """q and k as they come out of a fused qkv projection: strided heads and positions, contiguous last dim."""
    batch, seqlen, n_head, n_kv, hd = 2, 11, 4, 2, 24
    qkv = torch.randn(batch, seqlen, n_head + 2 * n_kv, hd, generator=gen())
    q, k, _ = qkv.split([n_head, n_kv, n_kv], dim=2)
    cos, sin = tables(seqlen, hd)
    seq_major = torch.randn(seqlen, batch, n_head, hd, generator=gen()).transpose(0, 1)  # batch stride < seq's
    for t in (q, k, seq_major[:, :, 1:3]):
        assert not t.is_contiguous()
        assert_matches_fp64(rotary_emb, rotary_emb_ref, [t, cos, sin], [0])
    # Non-contiguous tables are accepted too (the kernel copies those: they are small).
    wide_cos, wide_sin = (torch.stack([c, c], dim=-1)[..., 0] for c in (cos, sin))  # last-dim stride 2
    torch.testing.assert_close(rotary_emb(q, wide_cos, wide_sin), rotary_emb(q, cos, sin))


def test_rotary_backward_is_the_inverse_rotation_and_gradcheck():
    x = torch.randn(2, 5, 3, 10, dtype=torch.float64)
    cos, sin = tables(5, 10, dtype=torch.float64)
    y = torch.ops.fastdl.rotary_emb(x, cos, sin, False)
    torch.testing.assert_close(torch.ops.fastdl.rotary_emb(y, cos, sin, True), x)
    assert torch.autograd.gradcheck(lambda x: rotary_emb(x, cos, sin), (x.requires_grad_(),))


def test_rotary_bf16_rule():
    x = 3 * torch.randn(4, 64, 4, 32, generator=gen(), dtype=torch.float64)
    cos, sin = tables(64, 32)

    def composite(x, cos, sin):  # in x's dtype: what rotary_emb_ref does without its upcast
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    assert_low_precision_rule(rotary_emb, composite, [x, cos, sin], [0])


def test_rotary_empty_and_bad_input():
    cos, sin = tables(5, 8)
    assert rotary_emb(torch.randn(0, 5, 2, 8), cos, sin).shape == (0, 5, 2, 8)
    op = torch.ops.fastdl.rotary_emb
    with pytest.raises(RuntimeError, match="headdim .* must be even"):
        op(torch.randn(1, 5, 2, 7), cos[:, :3], sin[:, :3])
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        op(torch.randn(1, 5, 8, 2).transpose(-1, -2), cos, sin)
    with pytest.raises(RuntimeError, match=r"cos must have shape \(seqlen, headdim / 2\)"):
        op(torch.randn(1, 6, 2, 8), cos, sin)
    with pytest.raises(RuntimeError, match="sin must be Float"):
        op(torch.randn(1, 5, 2, 8), cos, sin.double())
    with pytest.raises(RuntimeError, match=r"x must have shape \(batch, seqlen, nheads, headdim\)"):
        op(torch.randn(5, 2, 8), cos, sin)


# ---- swiglu ------------------------------------------------------------------------------------------------


def swiglu_args(shape, dtype=torch.float32, seed=0):
    g = 3 * torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    u = torch.randn(shape, generator=gen(seed + 1), dtype=torch.float64)
    return g.to(dtype), u.to(dtype)


@pytest.mark.parametrize("shape", [(1,), (3, 7), (5, 33), (2, 3, 130), (17, 352)])
def test_swiglu_matches_reference(shape):
    assert_matches_fp64(swiglu, swiglu_ref, list(swiglu_args(shape)), [0, 1])


def test_swiglu_non_contiguous_and_extremes():
    fused = torch.randn(4, 9, 2 * 37, generator=gen())  # a fused gate/up projection's output
    gate, up = fused.chunk(2, dim=-1)
    assert_matches_fp64(swiglu, swiglu_ref, [gate, up], [0, 1])
    g, u = swiglu_args((30, 20))
    assert_matches_fp64(swiglu, swiglu_ref, [g.t(), u[::1, :].t()], [0, 1])
    g = torch.tensor([-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4]).reshape(1, 7)
    out, grads, _ = run(swiglu, [g, torch.ones_like(g)], [0, 1])
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(out, F.silu(g))


def test_swiglu_gradcheck_fp64_and_bf16_rule():
    g, u = swiglu_args((3, 13), dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu, (g.requires_grad_(), u.requires_grad_()))
    g, u = swiglu_args((64, 352), dtype=torch.float64)
    assert_low_precision_rule(swiglu, lambda g, u: F.silu(g) * u, [g, u], [0, 1])


def test_swiglu_empty_and_bad_input():
    assert swiglu(torch.randn(0, 5), torch.randn(0, 5)).shape == (0, 5)
    with pytest.raises(RuntimeError, match="up must have the shape of gate"):
        swiglu(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="up must have the dtype of gate"):
        swiglu(torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64))


# ---- torch.library and torch.compile -----------------------------------------------------------------------


def test_opcheck():
    x, ns, w = rms_args((5, 24))
    torch.library.opcheck(torch.ops.fastdl.rms_norm_fwd.default, (x.requires_grad_(), ns, w.requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.fastdl.rms_norm_fwd.default, (x, ns, None, 1e-5))
    _, rstd = torch.ops.fastdl.rms_norm_fwd(x.detach(), ns, w.detach(), 1e-5)
    torch.library.opcheck(torch.ops.fastdl.rms_norm_bwd.default, (torch.randn(5, 24), x.detach(), ns, w.detach(), rstd))
    q = torch.randn(2, 6, 8, 16)[:, :, ::2].requires_grad_()
    cos, sin = tables(6, 16)
    torch.library.opcheck(torch.ops.fastdl.rotary_emb.default, (q, cos, sin, False))
    g, u = swiglu_args((4, 33))
    torch.library.opcheck(torch.ops.fastdl.swiglu_fwd.default, (g.requires_grad_(), u.requires_grad_()))
    torch.library.opcheck(torch.ops.fastdl.swiglu_bwd.default, (torch.randn(4, 33), g.detach(), u.detach()))


def test_torch_compile_fullgraph():
    x, ns, w = rms_args((2, 6, 32))
    cos, sin = tables(6, 8)
    up = torch.randn(2, 6, 32)

    def f(x, w, up):
        h = rms_norm(x, ns, w, 1e-5)
        h = rotary_emb(h.view(2, 6, 4, 8), cos, sin).view(2, 6, 32)
        return swiglu(h, up).sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, up)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, w, up)]
    eager = f(*leaves)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    for a, b in zip(compiled_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x, ns, w = rms_args((37, 200), dtype=dtype)
    g, u = swiglu_args((37, 200), dtype=dtype)
    q = torch.randn(3, 19, 12, 64, dtype=dtype)[:, :, 2:8]
    cos, sin = tables(19, 64, batch=3)
    for fn, args, diff in ((rms_fn(rms_norm), [x, ns, w], [0, 2]), (swiglu, [g, u], [0, 1]),
                           (rotary_emb, [q, cos, sin], [0])):
        out, grads, grad = run(fn, args, diff)
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        cuda_out, cuda_grads, _ = run(fn, cuda_args, diff, grad.cuda())
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(cuda_out.cpu(), out, **tol)
        for a, b in zip(cuda_grads, grads):
            torch.testing.assert_close(a.cpu(), b, **tol)
