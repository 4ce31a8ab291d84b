"""Timing one call on CPU or CUDA, and measuring the memory bandwidth the results are compared to."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from fastdl.bench.core import StepFn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Times one call of a function in milliseconds.

    On CUDA the time is between two events recorded around the call, so it covers the GPU work and any
    gap in which the GPU waits for the host to launch (which the user pays for too); the end event is
    waited on, so the next call starts on an idle device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: StepFn) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth measured with a large device-to-same-device copy."""

    gb_per_s: float  # of the median copy; a copy counts its bytes twice (read source + write destination)
    best_gb_per_s: float  # of the fastest copy: on a shared machine, closer to what the hardware can do
    buffer_bytes: int
    times_ms: list[float]
    method: str


def default_copy_buffer_bytes(device: torch.device) -> int:
    # 256 MiB is 8x the 32 MiB L3 of the 2-core dev box and larger than any server CPU's LLC, so the
    # copy streams from DRAM; GPUs copy 256 MiB in ~0.1 ms, so 1 GiB keeps event-timing error small.
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def measure_copy_bandwidth(device: torch.device, buffer_bytes: int | None = None,
                           repeat: int = 10) -> Bandwidth:
    """The bandwidth ceiling the benchmarks report against: median of ``repeat`` ``dst.copy_(src)``."""
    buffer_bytes = buffer_bytes or default_copy_buffer_bytes(device)
    numel = buffer_bytes // 4
    # torch.ones writes every page; torch.zeros may map the shared zero page, and reading that is a cache hit.
    source = torch.ones(numel, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    timer = CallTimer(device)
    synchronize(device)

    def copy() -> None:
        destination.copy_(source)

    # The first copy also faults in the destination's pages; it is not timed.
    timer(copy)
    times_ms = [timer(copy) for _ in range(repeat)]
    bytes_moved = 2 * numel * 4
    return Bandwidth(
        gb_per_s=bytes_moved / (statistics.median(times_ms) * 1e-3) / 1e9,
        best_gb_per_s=bytes_moved / (min(times_ms) * 1e-3) / 1e9,
        buffer_bytes=numel * 4,
        times_ms=times_ms,
        method=f"torch copy_ of a {numel * 4 >> 20} MiB fp32 buffer on {device}, read+write bytes, "
               f"median of {repeat}, {torch.get_num_threads()} torch threads",
    )
