"""What a benchmark suite is made of.

A :class:`Suite` makes :class:`Case` s; each case is one workload (one optimizer step on given
shapes, one attention call, ...) that several :class:`Contender` s - fastdl and its peers - run in the
same process, so that their times are comparable. ``fastdl bench`` and ``pytest benchmarks/`` both
take their cases from here, so a case is defined once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch

StepFn = Callable[[], object]
"""One call is one unit of timed work (e.g. one ``optimizer.step()``)."""


@dataclass(frozen=True)
class Contender:
    """One implementation of a case's workload.

    ``setup(device)`` builds the inputs and any state a realistic call needs (e.g. a few optimizer
    steps so that the moments exist), outside the timed region, and returns the function to time.
    Inputs are built lazily so that only one case's contenders are in memory at a time.
    """

    name: str
    setup: Callable[[torch.device], StepFn]
    is_fastdl: bool = False


@dataclass(frozen=True)
class Case:
    """One workload and the contenders that run it."""

    name: str  # unique within its suite; used in table rows, pytest ids and JSON
    description: str
    # Minimum memory traffic of one call: every byte the math must read or write, counted once. It is
    # the same for every contender, so GB/s compares implementations doing the same work, and
    # bytes_per_step / bandwidth is the time floor of a memory-bound kernel.
    bytes_per_step: int
    contenders: tuple[Contender, ...]
    params: Mapping[str, object] = field(default_factory=dict)  # shapes, dtypes, ...: recorded in the JSON


@dataclass(frozen=True)
class Suite:
    """A family of benchmarks (``optim``, later ``attention``, ``scan``, ...)."""

    name: str
    description: str
    # (quick, device) -> cases. quick: a small smoke-test version that runs in seconds. The device lets
    # a suite drop cases a device cannot run (e.g. CUDA-only kernels).
    make_cases: Callable[[bool, torch.device], list[Case]]

    def cases(self, quick: bool = False, device: torch.device | str = "cpu") -> list[Case]:
        cases = self.make_cases(quick, torch.device(device))
        names = [case.name for case in cases]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"suite {self.name!r} defines cases with the same name: {duplicates}")
        return cases
