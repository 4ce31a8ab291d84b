"""Convolution benchmarks: fastdl's fused conv -> BN -> ReLU (one kernel, BN folded) against the eager
torch sequence a user runs in eval mode, ``relu(bn(conv(x)))`` (oneDNN on CPU, cuDNN on GPU), and
against torch's own Conv-BN folding (``torch.nn.utils.fusion.fuse_conv_bn_eval`` then conv + relu).

Shapes are ResNet's four stages (56x56x64, 28x28x128, 14x14x256, 7x7x512) with a 3x3 and a 1x1 conv
each, batch 8 on CPU (fp32, NCHW, as torch's default) and batch 64 bf16 channels_last on GPU. Also a
ResNet-50 forward at batch 8 on 224x224 (CPU) built from torch.nn, fastdl.fuse'd against the eager model.
fastdl's modules pack each conv's weight into the CPU kernel's panel layout on their first inference call
and reuse it while the weight is unchanged (fastdl.nn.Conv2d), as oneDNN's weight prepacking does; eager
torch reorders per call. The warm-up calls take the one-time pack.
FLOPs: 2 * N * H_out * W_out * C_out * C_in * kH * kW per conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl.bench.core import Case, Contender, StepFn, Suite


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    size: int
    kernel: int
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def flops(self) -> int:
        return 2 * self.batch * self.size**2 * self.channels**2 * self.kernel**2

    def io_bytes(self) -> int:
        elt = torch.empty((), dtype=self.dtype).element_size()
        return elt * (2 * self.batch * self.channels * self.size**2 + self.channels**2 * self.kernel**2)

    def label(self) -> str:
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        layout = "nhwc" if self.channels_last else "nchw"
        return f"n{self.batch}-{self.size}x{self.size}x{self.channels}-k{self.kernel}-{dtype}-{layout}"


def _modules(shape: Shape, device: torch.device) -> tuple[nn.Conv2d, nn.BatchNorm2d, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    conv = nn.Conv2d(shape.channels, shape.channels, shape.kernel, padding=shape.kernel // 2, bias=False)
    bn = nn.BatchNorm2d(shape.channels)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
        bn.weight.uniform_(0.5, 1.5, generator=generator), bn.bias.normal_(generator=generator)
        bn.running_mean.normal_(generator=generator), bn.running_var.uniform_(0.5, 2, generator=generator)
    conv, bn = conv.to(device, shape.dtype).eval(), bn.to(device, shape.dtype).eval()
    x = torch.randn(shape.batch, shape.channels, shape.size, shape.size, generator=generator)
    x = x.to(device, shape.dtype)
    if shape.channels_last:
        x = x.to(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    return conv, bn, x


def _fastdl(shape: Shape) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        conv, bn, x = _modules(shape, device)
        fused = fastdl.fuse(nn.Sequential(conv, bn, nn.ReLU()))

        def forward():
            with torch.no_grad():
                return fused(x)
        return forward
    return setup


def _eager(shape: Shape) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        conv, bn, x = _modules(shape, device)

        def forward():
            with torch.no_grad():
                return F.relu(bn(conv(x)))
        return forward
    return setup


def _torch_folded(shape: Shape) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        conv, bn, x = _modules(shape, device)
        folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)

        def forward():
            with torch.no_grad():
                return F.relu(folded(x))
        return forward
    return setup


def make_case(shape: Shape) -> Case:
    return Case(
        name=f"conv-bn-relu-{shape.label()}",
        description=f"conv{shape.kernel}x{shape.kernel} + BN + ReLU (eval), {shape.label()}",
        bytes_per_step=shape.io_bytes(),
        flops_per_step=shape.flops(),
        contenders=(Contender("fastdl", _fastdl(shape), is_fastdl=True),
                    Contender("torch eager", _eager(shape)),
                    Contender("torch folded", _torch_folded(shape))),
        params={"batch": shape.batch, "channels": shape.channels, "size": shape.size, "kernel": shape.kernel,
                "dtype": str(shape.dtype), "channels_last": shape.channels_last},
    )


# ---- ResNet-50 inference ------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def resnet50_torch(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet50 layout (25,557,032 parameters) from torch.nn only."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


RESNET50_GMACS = 4.09  # multiply-adds of one 224x224 image (torchvision quotes 4.09 GFLOPS, counting MACs)


def _resnet50(fused: bool, batch: int) -> Callable[[torch.device], StepFn]:
    def setup(device: torch.device) -> StepFn:
        torch.manual_seed(0)
        model = resnet50_torch().eval().to(device)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_var.uniform_(0.5, 2)
        if fused:
            model = fastdl.fuse(model)
        x = torch.randn(batch, 3, 224, 224, device=device)

        def forward():
            with torch.no_grad():
                return model(x)
        return forward
    return setup


def resnet50_case(batch: int) -> Case:
    return Case(
        name=f"resnet50-fwd-n{batch}-224-fp32",
        description=f"ResNet-50 inference, batch {batch}, 224x224, fp32 NCHW: fastdl.fuse vs eager torch",
        bytes_per_step=batch * 3 * 224 * 224 * 4 + 25_557_032 * 4,
        flops_per_step=int(2 * RESNET50_GMACS * 1e9 * batch),
        contenders=(Contender("fastdl", _resnet50(True, batch), is_fastdl=True),
                    Contender("torch eager", _resnet50(False, batch))),
        params={"batch": batch, "size": 224, "dtype": "torch.float32"},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    stages = [(64, 56), (128, 28), (256, 14), (512, 7)]
    if device.type == "cuda":
        if not fastdl.build_info()["cuda"]:
            return []
        shapes = [Shape(64, c, s, k, torch.bfloat16, channels_last=True) for c, s in stages for k in (3, 1)]
        return [make_case(s) for s in (shapes[:2] if quick else shapes)]
    shapes = [Shape(8, c, s, k) for c, s in stages for k in (3, 1)]
    if quick:
        return [make_case(Shape(2, 32, 14, k)) for k in (3, 1)]
    return [make_case(s) for s in shapes] + [resnet50_case(8)]


SUITE = Suite(name="conv", make_cases=make_cases,
              description="fused conv + BN + ReLU (eval) on ResNet stage shapes, and ResNet-50 inference: "
                          "fastdl vs eager torch and torch's conv-BN folding")
