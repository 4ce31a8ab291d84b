"""Load the compiled extension fastdl._C, or explain exactly how to rebuild it."""

from __future__ import annotations

import glob
import hashlib
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REBUILD_HINT = (
    "Rebuild it from the repository root with:\n"
    "    pip install --no-build-isolation -e .\n"
    "(--no-build-isolation builds against the torch you have installed; see README.md)."
)


class ExtensionError(ImportError):
    """The compiled part of fastdl is missing, stale or built against another torch."""


def _source_hash() -> str | None:
    """Hash of csrc/ the way setup.py computes it, when running from a source checkout."""
    csrc = os.path.join(_ROOT, "csrc")
    if not os.path.isdir(csrc):
        return None
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, _ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def load():
    import torch

    from fastdl._version import __version__

    try:
        from fastdl import _C
    except ImportError as e:
        raise ExtensionError(f"fastdl's compiled extension fastdl._C could not be loaded ({e}).\n{REBUILD_HINT}") from e
    info = _C.build_info()
    if info["version"] != __version__:
        raise ExtensionError(
            f"fastdl._C was built for fastdl {info['version']} but the Python package is {__version__}.\n{REBUILD_HINT}"
        )
    if info["torch_version"] != torch.__version__:
        raise ExtensionError(
            f"fastdl._C was built against torch {info['torch_version']} but torch {torch.__version__} is "
            f"installed.\n{REBUILD_HINT}"
        )
    if os.environ.get("FASTDL_SKIP_STALE_CHECK") != "1":
        current = _source_hash()
        if current is not None and current != info["source_hash"]:
            raise ExtensionError(
                "fastdl._C is stale: the C++/CUDA sources under csrc/ changed since it was built "
                f"(built {info['source_hash']}, sources now {current}).\n{REBUILD_HINT}\n"
                "Set FASTDL_SKIP_STALE_CHECK=1 to import the old build anyway."
            )
    return _C
