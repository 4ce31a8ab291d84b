"""fastdl: hand-written fused CPU and CUDA kernels for PyTorch, and the modules, models and trainers
built on them. Ops are registered under ``torch.ops.fastdl``; Python APIs live in ``fastdl.ops``,
``fastdl.optim``, ``fastdl.nn`` and ``fastdl.models``."""

from fastdl._extension import ExtensionError, load as _load_extension
from fastdl._version import __version__

_C = _load_extension()

from fastdl import ops, optim  # noqa: E402
from fastdl.ops import (  # noqa: E402
    causal_conv1d_fn,
    causal_conv1d_update,
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
    "ops",
    "optim",
    "selective_scan_fn",
    "selective_state_update",
]
