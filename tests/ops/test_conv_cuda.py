"""conv2d_fused's CUDA kernel (implicit GEMM, mma.sync tensor cores for fp16/bf16, FMA for fp32) against the
pure-PyTorch reference. Every test but the first is marked `cuda` and skipped where torch sees no GPU or
fastdl was built without CUDA. The CUDA backward does not exist yet: the last test pins its error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.ops import conv2d_fused, conv2d_fused_ref


def test_cuda_kernel_registered_iff_built_with_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::conv2d_fused", "CUDA")
    assert has == fastdl.build_info()["cuda"]


def _inputs(dtype, channels_last, groups=1, k=3, stride=1, padding=1, dilation=1, n=3, cin=24, cout=40, h=15,
            w=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    wt = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
    out_shape = F.conv2d(x, wt, stride=stride, padding=padding, dilation=dilation, groups=groups).shape
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


@pytest.mark.cuda
def test_backward_not_on_cuda_says_so():
    x, wt, _ = _inputs(torch.float32, False)
    x = x.cuda().requires_grad_(True)
    out = conv2d_fused(x, wt.cuda(), padding=1)
    with pytest.raises(RuntimeError, match="no CUDA kernel yet"):
        out.sum().backward()
