"""Quick A/B of the 8 ResNet stage shapes: fastdl.fuse(conv, bn, relu) vs eager, interleaved, medians of 25.

NT=1 (default) times with time.thread_time on one torch thread; NT=2 with wall clock on two threads.
Run against two builds with PYTHONPATH=<worktree> python benchmarks/conv_stage_quick.py [case ...].
"""
import os
import sys
import time

import torch
import torch.nn as nn

import fastdl

NT = int(os.environ.get("NT", "1"))
torch.manual_seed(0)
torch.set_num_threads(NT)
clock = time.thread_time if NT == 1 else time.perf_counter
cases = [(56, 64, 3), (56, 64, 1), (28, 128, 3), (28, 128, 1), (14, 256, 3), (14, 256, 1), (7, 512, 3), (7, 512, 1)]
for s, c, k in cases:
    name = f"{s}x{s}x{c}-k{k}"
    if sys.argv[1:] and name not in sys.argv[1:]:
        continue
    conv, bn = nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    seq = nn.Sequential(conv, bn, nn.ReLU()).eval()
    fused = fastdl.fuse(seq)
    x = torch.randn(8, c, s, s)
    with torch.no_grad():
        err = (seq(x) - fused(x)).abs().max().item()
        tf, te = [], []
        for _ in range(25):
            t = clock()
            fused(x)
            tf.append(clock() - t)
            t = clock()
            seq(x)
            te.append(clock() - t)
    a, b = sorted(tf)[12] * 1e3, sorted(te)[12] * 1e3
    print(f"{name:16s} fastdl {a:6.3f} eager {b:6.3f} ratio {a / b:5.2f} err {err:.1e}", flush=True)
