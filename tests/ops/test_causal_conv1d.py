"""causal_conv1d_fn and causal_conv1d_update against the pure-PyTorch references.

fp32 is compared with the reference run in fp64 on the same values (rtol 6e-4, atol 2e-3); bf16 uses
the low-precision rule (at most 2x the error of the reference run in bf16, 3x for gradients).
"""

from __future__ import annotations

import pytest
import torch

import fastdl
from fastdl.ops import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch=2, dim=6, seqlen=50, width=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, width, generator=g, dtype=torch.float64) / width**0.5
    b = torch.randn(dim, generator=g, dtype=torch.float64) if bias else None
    return x, weight, b


def run(fn, x, weight, bias, activation, grad=None):
    # detach() keeps the strides of non-contiguous inputs (clone() would not for strided views).
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[2], activation=activation)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    present = [t for t in leaves if t is not None]
    dx = torch.autograd.grad((out.double() * grad).sum(), present)
    return out, list(dx), grad


def assert_matches_fp64_ref(x, weight, bias, activation, dtype=torch.float32, weight_dtype=None):
    weight_dtype = weight_dtype or dtype
    args = (x.to(dtype), weight.to(weight_dtype), bias.to(weight_dtype) if bias is not None else None)
    out, dx, grad = run(causal_conv1d_fn, *args, activation)
    ref_args = (t.double() if t is not None else None for t in args)
    ref, ref_dx, _ = run(causal_conv1d_ref, *ref_args, activation, grad)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    for name, a, b, t in zip(("dx", "dweight", "dbias"), dx, ref_dx, [a for a in args if a is not None]):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        torch.testing.assert_close(a.double(), b, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("seqlen", [1, 7, 128, 255, 1024, 2048])
@pytest.mark.parametrize("width", [2, 3, 4, 5, 8])
def test_matches_reference(seqlen, width):
    activation = "silu" if width % 2 == 0 else None
    assert_matches_fp64_ref(*make_inputs(seqlen=seqlen, width=width, bias=seqlen != 7), activation)


@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("width", [6, 7])
def test_options(activation, bias, width):
    assert_matches_fp64_ref(*make_inputs(seqlen=33, width=width, bias=bias), activation)


def test_fp64_matches_reference_closely():
    x, w, b = make_inputs(seqlen=100, width=4)
    out, dx, grad = run(causal_conv1d_fn, x, w, b, "silu")
    ref, ref_dx, _ = run(causal_conv1d_ref, x, w, b, "silu", grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(dx, ref_dx):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
def test_low_precision_within_twice_reference_error(dtype, weight_dtype):
    x, w, b = make_inputs(batch=2, dim=16, seqlen=300, width=4)
    wdt = dtype if weight_dtype == "same" else weight_dtype
    args = (x.to(dtype), w.to(wdt), b.to(wdt))
    out, dx, grad = run(causal_conv1d_fn, *args, "silu")
    ref_lp, ref_lp_dx, _ = run(causal_conv1d_ref, *args, "silu", grad)
    ref, ref_dx, _ = run(causal_conv1d_ref, *(t.double() for t in args), "silu", grad)

    def err(a, c):
        return (a.double() - c).abs().max().item()

    assert out.dtype == dtype and dx[1].dtype == wdt
    assert err(out, ref) <= 2 * err(ref_lp, ref) + 1e-5
    for a, lp, c in zip(dx, ref_lp_dx, ref_dx):
        assert err(a, c) <= 3 * err(lp, c) + 1e-5


def test_channel_last_and_strided_inputs():
    x, w, b = make_inputs(batch=2, dim=8, seqlen=70, width=4)
    x_cl = x.float().transpose(1, 2).contiguous().transpose(1, 2)  # causal-conv1d's channel-last layout
    w_strided = torch.stack([w.float(), w.float()], dim=-1)[..., 1]
    assert x_cl.stride(1) == 1 and not w_strided.is_contiguous()
    out, dx, grad = run(causal_conv1d_fn, x_cl, w_strided, b.float(), "silu")
    ref, ref_dx, _ = run(causal_conv1d_fn, x.float(), w.float(), b.float(), "silu", grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, c in zip(dx, ref_dx):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("batch,dim,seqlen", [(0, 6, 50), (2, 0, 50), (2, 6, 0), (0, 0, 0)])
def test_empty_shapes(batch, dim, seqlen):
    """Outputs of the right shapes; gradients of a sum over nothing are zero."""
    x, w, b = (t.float() for t in make_inputs(batch=batch, dim=dim, seqlen=seqlen, width=4))
    out, dx, _ = run(causal_conv1d_fn, x, w, b, "silu")
    assert out.shape == (batch, dim, seqlen)
    for g, t in zip(dx, (x, w, b)):
        assert g.shape == t.shape and not g.any()
    state, token = torch.randn(batch, dim, 3), torch.randn(batch, dim)
    ref_state = state.clone()
    step = causal_conv1d_update(token, state, w, b, activation="silu")
    assert step.shape == (batch, dim)
    if dim == 0:  # the reference's F.conv1d refuses groups = 0
        return
    ref = causal_conv1d_update_ref(token, ref_state, w, b, activation="silu")
    torch.testing.assert_close(step, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, ref_state)


# ---- decoding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("extra_state", [0, 3])
def test_update_step_by_step_equals_full_sequence(width, extra_state):
    x, w, b = (t.float() for t in make_inputs(batch=2, dim=5, seqlen=30, width=width))
    full = causal_conv1d_fn(x, w, b, activation="silu")
    state = torch.zeros(2, 5, width - 1 + extra_state)
    steps = [causal_conv1d_update(x[:, :, t], state, w, b, activation="silu") for t in range(30)]
    assert steps[0].shape == (2, 5)
    torch.testing.assert_close(torch.stack(steps, dim=-1), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, x[:, :, -state.shape[-1]:])


def test_update_several_tokens_and_strided_state_match_reference():
    x, w, b = (t.float() for t in make_inputs(batch=3, dim=4, seqlen=5, width=4))
    base = torch.randn(3, 6, 4).transpose(1, 2)  # (batch, dim, state_len=6), dim contiguous
    state, ref_state = base.clone().transpose(1, 2).contiguous().transpose(1, 2), base.clone()
    out = causal_conv1d_update(x, state, w, b, activation=None)
    ref = causal_conv1d_update_ref(x, ref_state, w, b, activation=None)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, ref_state)


def test_update_bf16_matches_reference():
    x, w, b = (t.to(torch.bfloat16) for t in make_inputs(batch=2, dim=8, seqlen=1, width=3))
    state = torch.randn(2, 8, 2).to(torch.bfloat16)
    ref_state = state.clone()
    out = causal_conv1d_update(x[..., 0], state, w, b, activation="swish")
    ref = causal_conv1d_update_ref(x[..., 0], ref_state, w, b, activation="swish")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(state, ref_state)


# ---- autograd, torch.library and torch.compile ------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_fp64(activation):
    x, w, b = (t.requires_grad_() for t in make_inputs(batch=2, dim=3, seqlen=9, width=3))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_fn(*a, activation=activation), (x, w, b))


def test_opcheck():
    x, w, b = (t.float().requires_grad_() for t in make_inputs(seqlen=20))
    torch.library.opcheck(torch.ops.fastdl.causal_conv1d_fwd.default, (x, w, b, True))
    torch.library.opcheck(torch.ops.fastdl.causal_conv1d_fwd.default, (x, w, None, False))
    torch.library.opcheck(torch.ops.fastdl.causal_conv1d_bwd.default, (x.detach(), w.detach(), b.detach(),
                                                                       torch.randn_like(x), True))
    state = torch.randn(2, 6, 3)
    torch.library.opcheck(torch.ops.fastdl.causal_conv1d_update.default,
                          (x[..., :1].detach(), state, w.detach(), b.detach(), True))


def test_torch_compile_fullgraph():
    x, w, b = (t.float() for t in make_inputs(seqlen=40))

    def f(x, w, b):
        return fastdl.causal_conv1d_fn(x, w, b, activation="silu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    got, eager = compiled(*compiled_leaves), f(*eager_leaves)
    torch.testing.assert_close(got, eager)
    for a, c in zip(torch.autograd.grad(got, compiled_leaves), torch.autograd.grad(eager, eager_leaves)):
        torch.testing.assert_close(a, c)


# ---- bad input ---------------------------------------------------------------------------------------------


WIDTH_MESSAGE = r"width \(weight.shape\[1\]\) must be in \[2, 8\]"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, w, b: causal_conv1d_fn(x, torch.randn(6, 1), None), WIDTH_MESSAGE),
        (lambda x, w, b: causal_conv1d_fn(x, torch.randn(6, 9), None), WIDTH_MESSAGE),
        (lambda x, w, b: causal_conv1d_fn(x, torch.randn(5, 4), None),
         r"weight must have shape \(dim, width\) = \(6"),
        (lambda x, w, b: causal_conv1d_fn(x, w, torch.randn(5)), r"bias must have shape \[6\]"),
        (lambda x, w, b: causal_conv1d_fn(x, w.double(), None), "weight must have the dtype of x"),
        (lambda x, w, b: causal_conv1d_fn(x, w, b.double()), "bias must have the dtype of weight"),
        (lambda x, w, b: causal_conv1d_fn(x[0], w, b), r"x must have shape \(batch, dim, seqlen\)"),
        (lambda x, w, b: causal_conv1d_fn(x, w.to("meta"), None), "weight is on meta but x is on cpu"),
        (lambda x, w, b: causal_conv1d_update(x[..., 0], torch.zeros(2, 6, 2), w, b),
         r"state_len >= width - 1 = 3"),
        (lambda x, w, b: causal_conv1d_update(x[..., 0], torch.zeros(2, 6, 3, dtype=torch.bfloat16), w, b),
         "conv_state must have the dtype of x"),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    x, w, b = (t.float() for t in make_inputs(seqlen=10))
    with pytest.raises(RuntimeError, match=message):
        call(x, w, b)


def test_bad_activation():
    x, w, b = (t.float() for t in make_inputs(seqlen=10))
    with pytest.raises(NotImplementedError, match="activation must be None, 'silu' or 'swish'"):
        causal_conv1d_fn(x, w, b, activation="relu")
