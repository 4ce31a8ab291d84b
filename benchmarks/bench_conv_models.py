"""Whole-model CNN inference on the CPU: fastdl's ResNet-50 against eager torch with identical weights.

Contenders, all in eval mode, fp32, NCHW, measured interleaved in one process:

* ``torch eager``: torchvision's ResNet-50 layout in plain torch modules (conv -> BatchNorm2d -> ReLU,
  residual add), defined below; the weights are copied from the fastdl model.
* ``torch fx fold``: the same model after ``torch.fx.experimental.optimization.fuse`` (BN folded into the
  conv weights; ReLU and the add stay separate ops), torch's own Conv-BN folding.
* ``fastdl.fuse``: the eager model rewritten by :func:`fastdl.fuse` (conv + BN + add + ReLU in one kernel).
* ``fastdl ResNet50``: :func:`fastdl.models.resnet50` itself (ConvBNAct folds its BN in eval).

Prints the median wall time and the median thread CPU time per forward (``time.thread_time``: with one
thread it excludes waiting for a core on a shared machine), GFLOP/s (multiply-adds x 2 of every conv
and the fc, over the thread CPU time with one thread, over the wall time with more), the ratio to eager
torch on the same clock, and the max |difference| of each contender's logits from eager torch's.

    PYTHONPATH=. python benchmarks/bench_conv_models.py [--batch 8] [--size 224] [--threads 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn
from torch.fx.experimental import optimization as fx_optimization

import fastdl
from fastdl.models import resnet50


class TorchBottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5), plain torch."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TorchResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for i, blocks in enumerate((3, 4, 6, 3)):
            planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(TorchBottleneck(inplanes, planes, stride if j == 0 else 1, j == 0))
                inplanes = planes * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copies src's state_dict into dst's by position: both list the same tensors in the same order
    (conv, bn, ..., downsample conv, bn per block, then fc); shapes are checked."""
    src_state, dst_state = src.state_dict(), dst.state_dict()
    if len(src_state) != len(dst_state):
        raise ValueError(f"{len(src_state)} tensors in the source, {len(dst_state)} in the destination")
    with torch.no_grad():
        for (ks, vs), (kd, vd) in zip(src_state.items(), dst_state.items()):
            if vs.shape != vd.shape:
                raise ValueError(f"{ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}")
            vd.copy_(vs)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine, so that folding the BN is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def conv_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of every Conv2d and Linear in one forward of x."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = resnet50().eval()
    randomize_bn(ours)
    eager = TorchResNet50().eval()
    copy_weights(ours, eager)
    contenders = {
        "torch eager": eager,
        "torch fx fold": fx_optimization.fuse(eager),
        "fastdl.fuse": fastdl.fuse(eager),
        "fastdl ResNet50": ours,
    }
    x = torch.randn(args.batch, 3, args.size, args.size)
    flops = conv_flops(eager, x)
    with torch.no_grad():
        reference = eager(x)
        errors = {name: (m(x) - reference).abs().max().item() for name, m in contenders.items()}

    walls: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    with torch.no_grad():
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
                wall, cpu = time.perf_counter(), time.thread_time()
                contenders[name](x)
                cpus[name].append(time.thread_time() - cpu)
                walls[name].append(time.perf_counter() - wall)

    print(f"ResNet-50 inference, batch {args.batch}, {args.size}x{args.size}, fp32 NCHW, threads {args.threads}, "
          f"{flops / 1e9:.1f} GFLOP per forward, median of {args.reps}, load average {os.getloadavg()[0]:.1f}")
    timing = cpus if args.threads == 1 else walls  # thread_time sees only the calling thread
    base = statistics.median(timing["torch eager"])
    print(f"{'contender':<18}{'wall ms':>10}{'cpu ms':>10}{'GFLOP/s':>10}{'vs eager':>10}{'max |diff|':>12}")
    for name in names:
        t = statistics.median(timing[name])
        print(f"{name:<18}{statistics.median(walls[name]) * 1e3:>10.0f}{statistics.median(cpus[name]) * 1e3:>10.0f}"
              f"{flops / t / 1e9:>10.1f}{t / base:>10.2f}{errors[name]:>12.2e}")


if __name__ == "__main__":
    main()
