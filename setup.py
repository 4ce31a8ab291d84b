"""Build fastdl._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FASTDL_CUDA=0|1          force the CUDA build off/on (default: on iff torch.version.cuda and nvcc exist)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  FASTDL_CPU_ARCH          value for -march (default "native": the extension is built where it runs)
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension)

Install with `pip install --no-build-isolation -e .`: an isolated build environment would
resolve its own torch (several GB of CUDA wheels) and build against a torch you do not run.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "fastdl", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def cuda_requested() -> bool:
    flag = os.environ.get("FASTDL_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            sys.exit(f"FASTDL_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and torch.version.cuda is None:
            sys.exit(f"FASTDL_CUDA=1 but the installed torch {torch.__version__} was built without CUDA")
        return flag == "1"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def compiler_macros(march: str) -> set:
    """Predefined macros of the host compiler for -march, to learn which ISA we build for."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", "-"], input="",
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def compiler_version(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return "unknown"


def source_hash() -> str:
    """Hash of every C++/CUDA source; fastdl compares it at import to detect a stale build."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_extension():
    with_cuda = cuda_requested()
    march = os.environ.get("FASTDL_CPU_ARCH", "native")
    macros = compiler_macros(march)
    isa = [name for name, macro in [("avx512f", "__AVX512F__"), ("avx512bf16", "__AVX512BF16__"),
                                    ("avx2", "__AVX2__"), ("fma", "__FMA__"), ("neon", "__ARM_NEON")]
           if macro in macros]
    # at::vec picks its SIMD width from CPU_CAPABILITY_*; match it to what -march enables
    # (torch's own kernels do the same through DispatchStub, compiled once per ISA).
    if "__AVX512F__" in macros and "__AVX512BW__" in macros and "__AVX512VL__" in macros and "__AVX512DQ__" in macros:
        vec_macros = [("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)]
        vec_isa = "AVX512"
    elif "__AVX2__" in macros and "__FMA__" in macros:
        vec_macros = [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)]
        vec_isa = "AVX2"
    else:
        vec_macros, vec_isa = [], "DEFAULT"

    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0") if with_cuda else ""
    cxx_version = compiler_version([os.environ.get("CXX", "c++"), "--version"])
    nvcc_version = "not built"
    if with_cuda:
        nvcc_bin = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
        lines = subprocess.run([nvcc_bin, "--version"], capture_output=True, text=True).stdout.splitlines()
        nvcc_version = lines[-1].strip() if lines else "unknown"

    define_macros = vec_macros + [
        ("FASTDL_VERSION", c_string(read_version())),
        ("FASTDL_CPU_ISA", c_string(" ".join(isa) or "baseline")),
        ("FASTDL_VEC_ISA", c_string(vec_isa)),
        ("FASTDL_CXX_VERSION", c_string(cxx_version)),
        ("FASTDL_NVCC_VERSION", c_string(nvcc_version)),
        ("FASTDL_CUDA_ARCHS", c_string(arch_list)),
        ("FASTDL_SOURCE_HASH", c_string(source_hash())),
        ("FASTDL_TORCH_VERSION", c_string(torch.__version__)),
    ]
    if with_cuda:
        define_macros.append(("FASTDL_WITH_CUDA", None))

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                      + [p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
                         if not p.endswith("_cuda.cpp") and os.path.dirname(p) != os.path.join(ROOT, "csrc")])
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
                       + glob.glob(os.path.join(ROOT, "csrc", "**", "*_cuda.cpp"), recursive=True))

    cxx_flags = ["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off", "-Wno-unused-parameter"]
    # -ffp-contract=off: torch's reference optimizers do not fuse multiply-adds, and the optimizer
    # tests compare 200 steps within 1e-6; kernels opt into FMA explicitly where they want it.
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=true"]
    kwargs = dict(
        name="fastdl._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
    return CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)


setup(
    name="fastdl",
    version=read_version(),
    packages=find_packages(include=["fastdl", "fastdl.*"]),
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
