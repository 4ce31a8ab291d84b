"""The CUDA causal conv1d (csrc/causal_conv1d/causal_conv1d_kernel.cuh) on a GPU, against causal_conv1d_ref in
fp64 on the same GPU: fp32 within rtol 6e-4 / atol 2e-3, fp16 / bf16 within 2x (3x for gradients) the error of
the reference run in that dtype. Skipped without a GPU; the kernels' logic is also checked on the CPU by
test_causal_conv1d_emu.py.
"""

import pytest
import torch

from fastdl.ops import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

from .test_causal_conv1d import ATOL, RTOL, make_inputs

pytestmark = pytest.mark.cuda


def run(fn, x, w, b, activation, grad):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], leaves[2], activation=activation)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out.double() * grad).sum(), present)


@pytest.mark.parametrize("seqlen", [1, 7, 128, 255, 1024, 2048])
@pytest.mark.parametrize("width", [2, 3, 4, 5, 6, 7, 8])
def test_matches_reference(seqlen, width):
    activation = "silu" if width % 2 == 0 else None
    x, w, b = (t.cuda() for t in make_inputs(seqlen=seqlen, width=width, seed=seqlen))
    grad = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    out, dx = run(causal_conv1d_fn, x.float(), w.float(), b.float(), activation, grad)
    ref, ref_dx = run(causal_conv1d_ref, x, w, b, activation, grad)
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    for a, r in zip(dx, ref_dx):
        torch.testing.assert_close(a.double(), r, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_low_precision(dtype, fp32_weight):
    x, w, b = (t.cuda() for t in make_inputs(batch=2, dim=64, seqlen=1500, width=4))
    wd = torch.float32 if fp32_weight else dtype
    args = (x.to(dtype), w.to(wd), b.to(wd))
    grad = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    out, dx = run(causal_conv1d_fn, *args, "silu", grad)
    low, low_dx = run(causal_conv1d_ref, *args, "silu", grad)
    gold, gold_dx = run(causal_conv1d_ref, *(t.double() for t in args), "silu", grad)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, gold) <= 2 * err(low, gold) + 1e-6
    for a, lo, g in zip(dx, low_dx, gold_dx):
        assert err(a, g) <= 3 * err(lo, g) + 1e-5


def test_channel_last_equals_contiguous():
    x, w, b = (t.float().cuda() for t in make_inputs(batch=2, dim=16, seqlen=700, width=4))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(causal_conv1d_fn(xt, w, b, activation="silu"), causal_conv1d_fn(x, w, b, "silu"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("width,state_len,seqlen", [(4, 3, 1), (2, 5, 3), (8, 7, 9)])
def test_update_matches_reference(width, state_len, seqlen):
    x = torch.randn(3, 16, seqlen, device="cuda")
    state = torch.randn(3, 16, state_len, device="cuda")
    w, b = torch.randn(16, width, device="cuda"), torch.randn(16, device="cuda")
    s, s_ref = state.clone(), state.clone()
    out = causal_conv1d_update(x, s, w, b, activation="silu")
    ref = causal_conv1d_update_ref(x, s_ref, w, b, activation="silu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


def test_bad_inputs_on_cuda():
    x = torch.randn(1, 4, 10, device="cuda")
    with pytest.raises(RuntimeError, match=r"width \(weight.shape\[1\]\) must be in \[2, 8\], got 9"):
        causal_conv1d_fn(x, torch.randn(4, 9, device="cuda"))
    with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
        causal_conv1d_fn(x.double(), torch.randn(4, 4, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        causal_conv1d_fn(x, torch.randn(4, 4))
