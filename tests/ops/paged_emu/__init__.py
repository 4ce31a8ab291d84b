"""Builds the CUDA paged-attention kernels for the CPU (host_cuda.h) as a torch extension: `attn` has the
signature of torch.ops.fastdl.flash_attn_with_kvcache plus the number of SMs the split heuristic assumes.
Cached under build/paged-emu."""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def load_paged_emu(verbose: bool = False):
    from torch.utils.cpp_extension import CUDA_HOME, load

    cuda_include = pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "include"
    if not (cuda_include / "cuda_fp16.h").exists():
        raise RuntimeError(f"the emulator needs the CUDA headers (cuda_fp16.h) under {cuda_include}")
    build_dir = ROOT / "build" / "paged-emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="fastdl_paged_emu",
        sources=[str(HERE / "glue.cpp")],
        extra_include_paths=[str(HERE), str(ROOT / "csrc"), str(cuda_include)],
        extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas", "-Wno-unused-parameter"],
        build_directory=str(build_dir),
        verbose=verbose,
    )
