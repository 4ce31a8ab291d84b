"""The CUDA causal conv1d kernels (csrc/causal_conv1d/causal_conv1d_kernel.cuh), run on the CPU by the emulator
in tests/ops/cuda_emu through the real CUDA binding, against causal_conv1d_ref: tiles of 512 steps and their
edges, every width 2..8, silu, strides, fp32 / bf16 / fp16 weights, the per-block dweight / dbias sums, the
decoding update in place. Shared-memory accesses are checked for races and bounds; global ones are not.
Marked slow (building the emulator module takes a minute or two): run with --runslow.
"""

import pytest
import torch

from fastdl.ops import causal_conv1d_ref, causal_conv1d_update_ref

from .cuda_emu import load_simt_emu
from .test_causal_conv1d import ATOL, RTOL, make_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return load_simt_emu()


def emu_conv_fn(emu):
    class EmuConv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, silu):
            ctx.save_for_backward(x, weight, bias)
            ctx.silu = silu
            return emu.conv_fwd(x, weight, bias, silu)

        @staticmethod
        def backward(ctx, dout):
            x, weight, bias = ctx.saved_tensors
            dx, dw, db = emu.conv_bwd(x, weight, bias, dout.contiguous(), ctx.silu)
            return dx, dw, db if bias is not None else None, None

    return lambda x, w, b, silu: EmuConv.apply(x, w, b, silu)


def grads_of(fn, x, w, b, silu, grad):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves, silu)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out.double() * grad).sum(), present)


def ref_fn(x, w, b, silu):
    return causal_conv1d_ref(x, w, b, activation="silu" if silu else None)


@pytest.mark.parametrize("seqlen,width,silu,bias", [
    (1, 2, True, True), (7, 3, False, True), (513, 4, True, False), (1030, 8, True, True), (600, 5, False, True),
    (100, 7, True, True), (64, 6, False, False),
])
def test_conv_matches_reference(emu, seqlen, width, silu, bias):
    x, w, b = make_inputs(batch=2, dim=3, seqlen=seqlen, width=width, bias=bias, seed=seqlen)
    grad = torch.randn(2, 3, seqlen, dtype=torch.float64)
    args = (x.float(), w.float(), b.float() if b is not None else None)
    out, dx = grads_of(emu_conv_fn(emu), *args, silu, grad)
    ref, ref_dx = grads_of(ref_fn, x, w, b, silu, grad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    for name, a, r in zip(("dx", "dweight", "dbias"), dx, ref_dx):
        torch.testing.assert_close(a.double(), r, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_conv_channel_last_input(emu):
    x, w, b = make_inputs(batch=2, dim=5, seqlen=40, width=4)
    x = x.float().transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(emu.conv_fwd(x, w.float(), b.float(), True).double(),
                               ref_fn(x.double(), w, b, True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_conv_low_precision(emu, dtype, fp32_weight):
    x, w, b = make_inputs(batch=2, dim=4, seqlen=300, width=4)
    wd = torch.float32 if fp32_weight else dtype
    args = (x.to(dtype), w.to(wd), b.to(wd))
    grad = torch.randn(2, 4, 300, dtype=torch.float64)
    out, dx = grads_of(emu_conv_fn(emu), *args, True, grad)
    low, low_dx = grads_of(ref_fn, *args, True, grad)
    gold, gold_dx = grads_of(ref_fn, *(t.double() for t in args), True, grad)
    assert out.dtype == dtype and [g.dtype for g in dx] == [dtype, wd, wd]

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, gold) <= 2 * err(low, gold) + 1e-6
    for name, a, lo, g in zip(("dx", "dweight", "dbias"), dx, low_dx, gold_dx):
        assert err(a, g) <= 3 * err(lo, g) + 1e-5, name


@pytest.mark.parametrize("width,state_len,seqlen", [(4, 3, 1), (2, 5, 3), (8, 7, 9)])
def test_conv_update(emu, width, state_len, seqlen):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 6, seqlen, generator=g)
    state = torch.randn(2, 6, state_len, generator=g)
    w, b = torch.randn(6, width, generator=g), torch.randn(6, generator=g)
    s_emu, s_ref = state.clone(), state.clone()
    out = emu.conv_update(x, s_emu, w, b, True)
    ref = causal_conv1d_update_ref(x, s_ref, w, b, activation="silu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_emu, s_ref, rtol=0, atol=0)


def test_conv_fp64_rejected(emu):
    x, w, b = make_inputs(batch=1, dim=2, seqlen=5)
    with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
        emu.conv_fwd(x, w, b, False)
