"""Checkpoint files: written so that a crash never destroys the last good one, read back with
``weights_only=True`` (plain tensors, numbers and strings; no pickled code), and checked against the
model before anything is loaded.

Writing goes to a temporary file in the same directory, which is flushed and fsync'ed, then renamed
over the old checkpoint with ``os.replace``. The rename is atomic on POSIX and Windows, so a reader
(or a resumed run) sees the old file or the new one, never a torn one; a process killed mid-write
leaves at most a stray ``.checkpoint.pt.tmp-<pid>`` next to an intact ``checkpoint.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "fastdl.train.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run (missing, unreadable, or another model's)."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform / filesystem
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :class:`fastdl.train.Trainer`, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(path)!r} is not a fastdl trainer checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    return state


def model_signature(state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Parameter and buffer names with their shapes: what must match to load a checkpoint."""
    return {name: list(t.shape) for name, t in state_dict.items() if isinstance(t, torch.Tensor)}


def check_signature(saved: dict[str, list[int]], current: dict[str, list[int]], path: str | os.PathLike,
                    saved_model: str | None = None, current_model: str | None = None) -> None:
    """Raises CheckpointError describing how the checkpoint's model differs from this one."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [f"{k} {saved[k]} in the checkpoint, {current[k]} here" for k in current
                if k in saved and saved[k] != current[k]]
    if not (missing or unexpected or reshaped):
        return

    def head(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    what = f" (checkpoint model {saved_model}, this run's {current_model})" if saved_model != current_model else ""
    parts = [f"missing from it: {head(missing)}" if missing else "",
             f"not in this model: {head(unexpected)}" if unexpected else "",
             f"other shapes: {head(reshaped)}" if reshaped else ""]
    raise CheckpointError(f"checkpoint {str(path)!r} holds a different model{what}; "
                          + "; ".join(p for p in parts if p))


def capture_rng() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and every CUDA device in use)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants the nested tuples it produced; serialisation may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    """Seeds python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
