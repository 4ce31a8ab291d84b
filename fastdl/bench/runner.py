"""Run suites' cases: set up every contender of a case, time them in interleaved rounds, keep every time."""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field
from datetime import datetime

import torch
from tqdm import tqdm

from fastdl.bench.core import Case, StepFn, Suite
from fastdl.bench.machine import machine_info
from fastdl.bench.timing import Bandwidth, CallTimer, measure_copy_bandwidth, synchronize


@dataclass
class ContenderResult:
    name: str
    is_fastdl: bool
    times_ms: list[float] = field(default_factory=list)
    error: str | None = None  # set when setup or a call raised; its times are then dropped

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


@dataclass
class CaseResult:
    suite: str
    case: str
    description: str
    bytes_per_step: int
    params: dict
    contenders: list[ContenderResult]

    @property
    def fastdl(self) -> ContenderResult | None:
        return next((c for c in self.contenders if c.is_fastdl and c.median_ms is not None), None)

    @property
    def best_peer(self) -> ContenderResult | None:
        timed_peers = [c for c in self.contenders if not c.is_fastdl and c.median_ms is not None]
        return min(timed_peers, key=lambda c: c.median_ms, default=None)

    @property
    def ratio_vs_best_peer(self) -> float | None:
        """fastdl median / fastest peer median: below 1.0 means fastdl wins."""
        if self.fastdl is None or self.best_peer is None:
            return None
        return self.fastdl.median_ms / self.best_peer.median_ms

    def gb_per_s(self, contender: ContenderResult) -> float | None:
        if contender.median_ms is None:
            return None
        return self.bytes_per_step / (contender.median_ms * 1e-3) / 1e9


@dataclass
class BenchmarkRun:
    started_at: str
    command: str
    device: str
    quick: bool
    repeat: int
    warmup: int
    machine: dict
    bandwidth: Bandwidth
    results: list[CaseResult] = field(default_factory=list)

    def floor_ms(self, result: CaseResult) -> float:
        """The time a memory-bound case cannot beat: its bytes at the measured copy bandwidth."""
        return result.bytes_per_step / (self.bandwidth.gb_per_s * 1e9) * 1e3

    def percent_of_bandwidth(self, result: CaseResult, contender: ContenderResult) -> float | None:
        gb_per_s = result.gb_per_s(contender)
        return None if gb_per_s is None else 100 * gb_per_s / self.bandwidth.gb_per_s


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def run_case(suite_name: str, case: Case, device: torch.device, repeat: int, warmup: int) -> CaseResult:
    """Time every contender of ``case`` ``repeat`` times after ``warmup`` untimed calls.

    Contenders run in interleaved rounds rather than one after the other, so that load from other
    processes (this machine is shared) or clock changes fall on all of them alike. A contender that
    raises is recorded with its error and the others go on.
    """
    results = [ContenderResult(contender.name, contender.is_fastdl) for contender in case.contenders]
    steps: list[StepFn | None] = []
    for contender, result in zip(case.contenders, results):
        try:
            steps.append(contender.setup(device))
        except Exception as error:  # a missing or broken contender must not stop the other measurements
            result.error = _describe(error)
            steps.append(None)
    synchronize(device)

    timer = CallTimer(device)
    order = list(range(len(steps)))
    for round_index in range(warmup + repeat):
        # Rotate who goes first so that no contender always follows the same one.
        shift = round_index % len(order)
        for index in order[shift:] + order[:shift]:
            step = steps[index]
            if step is None:
                continue
            try:
                elapsed_ms = timer(step)
            except Exception as error:
                results[index].error = _describe(error)
                results[index].times_ms.clear()
                steps[index] = None
                continue
            if round_index >= warmup:
                results[index].times_ms.append(elapsed_ms)

    # Free this case's tensors before the next case allocates its own.
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return CaseResult(suite=suite_name, case=case.name, description=case.description,
                      bytes_per_step=case.bytes_per_step, params=dict(case.params), contenders=results)


def run_suites(suites: list[Suite], device: torch.device, quick: bool, repeat: int, warmup: int,
               command: str = "", progress: bool = True) -> BenchmarkRun:
    """Measure the bandwidth ceiling, then run every case of ``suites`` on ``device``."""
    started_at = datetime.now().astimezone().isoformat(timespec="seconds")
    bandwidth = measure_copy_bandwidth(device, repeat=5 if quick else 10)
    run = BenchmarkRun(started_at=started_at, command=command, device=str(device), quick=quick, repeat=repeat,
                       warmup=warmup, machine=machine_info(), bandwidth=bandwidth)
    work = [(suite, case) for suite in suites for case in suite.cases(quick, device)]
    with tqdm(work, desc="bench", unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for suite, case in bar:
            bar.set_postfix_str(f"{suite.name}/{case.name}")
            run.results.append(run_case(suite.name, case, device, repeat, warmup))
    return run
