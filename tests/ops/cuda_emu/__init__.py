"""Builds the CUDA flash-attention kernels for the CPU emulator (see emu_runtime.h) as a torch extension.

The module has fwd / varlen_fwd / bwd / varlen_bwd with the signatures of the four fastdl ops, run by the
real CUDA binding on CPU tensors, plus stats() and set_schedule(). Building takes a few minutes on two cores
(the host compiler sees every kernel instantiation); the result is cached under build/cuda-emu.
load_simt_emu builds the selective scan, causal conv1d and RNN cell kernels the same way (a minute or two),
cached under build/cuda-emu-simt; load_conv_emu the fused conv2d kernels, under build/cuda-emu-conv.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SOURCES = ["emu_runtime.cpp", "flash_glue.cpp", "kernels_flash_launch.cpp", "kernels_flash_fwd_fp16.cpp",
           "kernels_flash_fwd_bf16.cpp", "kernels_flash_bwd_fp16.cpp", "kernels_flash_bwd_bf16.cpp"]


SIMT_SOURCES = ["emu_runtime.cpp", "simt_glue.cpp", "kernels_scan_fwd.cpp", "kernels_scan_bwd.cpp", "kernels_conv.cpp",
                "kernels_rnn_cell.cpp"]
SIMT_BINDINGS = ["csrc/selective_scan/selective_scan_cuda.cpp", "csrc/causal_conv1d/causal_conv1d_cuda.cpp",
                 "csrc/lstm/lstm_cuda.cpp"]

CONV_SOURCES = ["emu_runtime.cpp", "conv_glue.cpp", "kernels_conv2d_fwd.cpp", "kernels_conv2d_bwd.cpp"]


def pretend_cuda() -> None:
    """For the emulator's pytest plugins: Tensor.cuda() returns the tensor itself (the emulated kernels take
    CPU tensors); with the hook below imported into a plugin, `cuda`-marked tests are not skipped."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    conftest = sys.modules.get("conftest")  # tests/conftest.py: its skip decision for `cuda` tests
    if conftest is not None:
        conftest.cuda_available = lambda: True


def load_flash_emu(verbose: bool = False):
    return _load("fastdl_flash_emu", SOURCES, ["csrc/flash_attn/flash_attn_cuda.cpp"], "cuda-emu", verbose)


def load_simt_emu(verbose: bool = False):
    """The plain-CUDA kernels (common/cuda_simt.cuh) on the emulator, through their real bindings: selective
    scan (fwd / bwd / update), causal conv1d (conv_fwd / conv_bwd / conv_update) and the recurrent ops
    (rnn_layer, rnn_layer_backward, lstm_cell, ...: the layer's GEMMs are torch's on the CPU), with the
    signatures of the fastdl ops."""
    return _load("fastdl_simt_emu", SIMT_SOURCES, SIMT_BINDINGS, "cuda-emu-simt", verbose)


def load_conv_emu(verbose: bool = False):
    """The fused conv2d kernels (conv_kernel.cuh, conv_bwd_kernel.cuh: mma.sync through flash_ptx.cuh, shared
    memory through common/cuda_simt.cuh) on the emulator, through the real binding csrc/conv/conv_cuda.cpp:
    fwd / bwd with the argument order of fastdl::conv2d_fused / conv2d_fused_backward (padding as 4 ints)."""
    return _load("fastdl_conv_emu", CONV_SOURCES, ["csrc/conv/conv_cuda.cpp"], "cuda-emu-conv", verbose)


def _load(name: str, sources: list, bindings: list, build: str, verbose: bool):
    from torch.utils.cpp_extension import CUDA_HOME, load

    cuda_include = pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "include"
    if not (cuda_include / "cuda_fp16.h").exists():
        raise RuntimeError(f"the CUDA emulator needs the CUDA headers (cuda_fp16.h) under {cuda_include}")
    build_dir = ROOT / "build" / build
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(HERE / s) for s in sources] + [str(ROOT / b) for b in bindings],
        # Order matters: the emulator's flash_ptx.cuh, common/cuda_simt.cuh and CUDA-header stubs shadow the real ones.
        extra_include_paths=[str(HERE / "include"), str(HERE), str(ROOT / "csrc"), str(cuda_include)],
        # Strict aliasing stays on (-O2): it once turned a uint4 read through __half* into garbage here.
        extra_cflags=["-O2", "-std=c++17", "-Wno-unknown-pragmas", "-Wno-unused-parameter"],
        build_directory=str(build_dir),
        verbose=verbose,
    )
