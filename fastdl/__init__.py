"""fastdl: hand-written fused CPU and CUDA kernels for PyTorch, and the modules, models and trainers
built on them. Ops are registered under ``torch.ops.fastdl``; Python APIs live in ``fastdl.ops``,
``fastdl.optim``, ``fastdl.nn``, ``fastdl.models``, ``fastdl.inference``, ``fastdl.data`` and ``fastdl.train``."""

from fastdl._extension import ExtensionError
from fastdl._extension import load as _load_extension
from fastdl._version import __version__

_C = _load_extension()

from fastdl import data, inference, models, nn, ops, optim, train  # noqa: E402
from fastdl.nn.fuse import fuse  # noqa: E402
from fastdl.ops import (  # noqa: E402
    causal_conv1d_fn,
    causal_conv1d_update,
    conv2d_fused,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    selective_scan_fn,
    selective_state_update,
)


def build_info() -> dict:
    """How the compiled extension was built (version, CPU ISA, CUDA and its architectures, compilers)."""
    return dict(_C.build_info())


__all__ = [
    "ExtensionError",
    "__version__",
    "build_info",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "conv2d_fused",
    "data",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "fuse",
    "inference",
    "models",
    "nn",
    "ops",
    "optim",
    "selective_scan_fn",
    "selective_state_update",
    "train",
]
