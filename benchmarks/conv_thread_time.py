"""Single-thread kernel comparison for the conv suite's shapes, timed with time.thread_time so that other
processes on a shared machine do not count (HELPERS: prefer one thread for kernel comparisons).

    PYTHONPATH=. python benchmarks/conv_thread_time.py [--kernel 3|1] [--resnet50] [--repeat 5]

Each shape: fastdl.fuse(conv -> BN -> ReLU) against eager relu(bn(conv(x))), outputs checked equal first.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl.bench.suites.conv import RESNET50_GMACS, Shape, _modules, resnet50_torch


def thread_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", type=int, choices=[1, 3])
    parser.add_argument("--resnet50", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [Shape(8, c, s, k) for c, s in [(64, 56), (128, 28), (256, 14), (512, 7)] for k in (3, 1)]
    for shape in [s for s in shapes if args.kernel in (None, s.kernel)]:
        conv, bn, x = _modules(shape, torch.device("cpu"))
        fused = fastdl.fuse(nn.Sequential(conv, bn, nn.ReLU()))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), F.relu(bn(conv(x))), atol=1e-3, rtol=1e-3)
            a = thread_time(lambda f=fused, x=x: f(x), args.repeat)
            b = thread_time(lambda c=conv, n=bn, x=x: F.relu(n(c(x))), args.repeat)
        print(f"{shape.label():32s} fastdl {a * 1e3:7.2f} ms ({shape.flops() / a / 1e9:6.1f} GFLOP/s)  "
              f"eager {b * 1e3:7.2f} ms  fastdl/eager {a / b:.2f}", flush=True)
    if args.resnet50:
        torch.manual_seed(0)
        model = resnet50_torch().eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_var.uniform_(0.5, 2)
        fused = fastdl.fuse(model)
        x = torch.randn(8, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-2, rtol=1e-2)
            a, b = thread_time(lambda: fused(x), 3), thread_time(lambda: model(x), 3)
        print(f"resnet50 n8 224 fp32  fastdl {a * 1e3:.0f} ms ({2 * RESNET50_GMACS * 8e9 / a / 1e9:.1f} GFLOP/s)  "
              f"eager {b * 1e3:.0f} ms  fastdl/eager {a / b:.2f}")


if __name__ == "__main__":
    main()
