"""conv2d_fused's CUDA kernel (implicit GEMM, mma.sync tensor cores for fp16/bf16, FMA for fp32) against the
pure-PyTorch reference, forward and backward. Every test but the first is marked `cuda` and skipped where torch
sees no GPU or fastdl was built without CUDA; the same kernels run on the CPU emulator in test_conv_emu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.ops import conv2d_fused, conv2d_fused_ref
from fastdl.ops.conv import _pair, apply_activation_ref, parse_padding


def test_cuda_kernel_registered_iff_built_with_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::conv2d_fused", "CUDA")
    assert has == fastdl.build_info()["cuda"]


def _inputs(dtype, channels_last, groups=1, k=3, stride=1, padding=1, dilation=1, n=3, cin=24, cout=40, h=15,
            w=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    wt = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
    # conv2d_fused_ref, not F.conv2d: padding may be asymmetric (4 ints)
    out_shape = conv2d_fused_ref(x, wt, stride=stride, padding=padding, dilation=dilation, groups=groups).shape
    extra = dict(bias=torch.randn(cout, generator=g), scale=torch.rand(cout, generator=g) + 0.5,
                 shift=torch.randn(cout, generator=g), residual=torch.randn(out_shape, generator=g))
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, wt.to(dtype), extra


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("conf", [dict(k=3, padding=1), dict(k=1, padding=0, stride=2),
                                  dict(k=5, padding=(2, 1, 0, 3), dilation=2, groups=2),
                                  dict(k=3, padding="same", groups=24, cout=24)],
                         ids=["3x3", "1x1s2", "5x5-asym-dil-g2", "depthwise"])
@pytest.mark.parametrize("activation", ["relu", "silu", ("leaky_relu", 0.1)])
def test_forward_matches_reference(dtype, channels_last, conf, activation):
    conf = dict(conf)
    cout = conf.pop("cout", 40)
    k = conf.pop("k")
    x, wt, extra = _inputs(dtype, channels_last, k=k, cout=cout, **conf)
    args = dict(activation=activation, **conf)
    ref32 = conv2d_fused_ref(x.float(), wt.float(), **extra, **args)  # fp32 reference on the CPU
    extra_cuda = {name: (t.cuda().to(dtype) if name == "residual" else t.cuda()) for name, t in extra.items()}
    out = conv2d_fused(x.cuda(), wt.cuda(), **extra_cuda, **args)
    assert out.dtype == dtype and out.shape == ref32.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.float().cpu() - ref32).abs().max()
    if dtype == torch.float32:
        assert err < 1e-3, err
    else:
        # torch in the same dtype on the GPU (cuDNN), against the same fp32 reference: at most 2x its error.
        torch_low = conv2d_fused_ref(x.cuda(), wt.cuda(), **{n: t.cuda().to(dtype) for n, t in extra.items()},
                                     **args)
        err_torch = (torch_low.float().cpu() - ref32).abs().max()
        assert err <= 2 * err_torch + 1e-3, (err, err_torch)


@pytest.mark.cuda
def test_fused_resnet_block_on_cuda():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(64).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2), bn.running_mean.normal_()
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).cuda().to(torch.bfloat16)
    fused = fastdl.fuse(model)
    x = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).float(), model(x).float(), atol=5e-2, rtol=5e-2)


def _grads(fn, x, wt, extra, args, dout):
    leaves = [x, wt] + [extra[n] for n in ("bias", "scale", "shift", "residual")]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(leaves[0], leaves[1], bias=leaves[2], scale=leaves[3], shift=leaves[4], residual=leaves[5], **args)
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _torch_low(x, wt, bias, scale, shift, residual, activation, stride=1, padding=0, dilation=1, groups=1):
    """The fused computation as separate torch ops, each in x's dtype (cuDNN on the GPU)."""
    k = (wt.shape[2], wt.shape[3])
    top, bottom, left, right = parse_padding(padding, k, _pair("stride", stride), _pair("dilation", dilation))
    y = F.conv2d(F.pad(x, (left, right, top, bottom)), wt, None, stride, 0, dilation, groups)
    c = (1, -1, 1, 1)
    return apply_activation_ref(y * scale.view(c) + shift.view(c) + bias.view(c) + residual, activation)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("conf", [dict(k=3, padding=1), dict(k=1, padding=0, stride=2),
                                  dict(k=5, padding=(2, 1, 0, 3), dilation=2, groups=2),
                                  dict(k=3, padding="same", groups=24, cout=24)],
                         ids=["3x3", "1x1s2", "5x5-asym-dil-g2", "depthwise"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", ("leaky_relu", 0.1)])
def test_backward_matches_reference(dtype, channels_last, conf, activation):
    """Every gradient against the fp32 reference's autograd: fp32 tight, fp16 / bf16 within 3x the error of
    torch's own backward in that dtype (on the GPU) against the same reference."""
    conf = dict(conf)
    cout = conf.pop("cout", 40)
    k = conf.pop("k")
    x, wt, extra = _inputs(dtype, channels_last, k=k, cout=cout, **conf)
    args = dict(activation=activation, **conf)
    extra = {name: t.to(dtype) for name, t in extra.items()}
    out_shape = extra["residual"].shape
    dout = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    ref = _grads(conv2d_fused_ref, x.float(), wt.float(), {n: t.float() for n, t in extra.items()}, args, dout)
    extra_cuda = {n: t.cuda() for n, t in extra.items()}
    got = _grads(conv2d_fused, x.cuda(), wt.cuda(), extra_cuda, args, dout.cuda())
    low = _grads(_torch_low, x.cuda(), wt.cuda(), extra_cuda, args, dout.cuda()) if dtype != torch.float32 else None
    for i, name in enumerate(["x", "weight", "bias", "scale", "shift", "residual"]):
        assert got[i].dtype == dtype and got[i].shape == ref[i].shape, name
        err = (got[i].float().cpu() - ref[i]).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * (ref[i].abs().max().item() + 1), (name, err)
        else:
            err_torch = (low[i].float().cpu() - ref[i]).abs().max().item()
            assert err <= 3 * err_torch + 1e-6, (name, err, err_torch)


@pytest.mark.cuda
def test_backward_is_deterministic():
    """Fixed-order reductions (no atomics): two backward passes give bitwise the same gradients."""
    x, wt, extra = _inputs(torch.bfloat16, True, n=8, cin=32, cout=64, h=28, w=28)
    extra = {name: t.cuda().to(torch.bfloat16) for name, t in extra.items()}
    dout = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.bfloat16)
    runs = [_grads(conv2d_fused, x.cuda(), wt.cuda(), extra, dict(padding=1, activation="silu"), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
