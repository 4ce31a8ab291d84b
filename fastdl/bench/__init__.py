"""Benchmarks that time fastdl against its peers in the same run.

``fastdl bench [NAME ...]`` runs registered suites and writes a table, JSON and plots;
``pytest benchmarks/`` runs the same cases under pytest-benchmark. A suite is one module in
:mod:`fastdl.bench.suites` that defines ``SUITE``; see :mod:`fastdl.bench.suites.optim`.
"""

from fastdl.bench.core import Case, Contender, StepFn, Suite
from fastdl.bench.machine import default_device, machine_info
from fastdl.bench.registry import get_suite, suite_names
from fastdl.bench.runner import BenchmarkRun, CaseResult, ContenderResult, run_case, run_suites
from fastdl.bench.timing import Bandwidth, CallTimer, measure_copy_bandwidth, synchronize

__all__ = [
    "Bandwidth",
    "BenchmarkRun",
    "CallTimer",
    "Case",
    "CaseResult",
    "Contender",
    "ContenderResult",
    "StepFn",
    "Suite",
    "default_device",
    "get_suite",
    "machine_info",
    "measure_copy_bandwidth",
    "run_case",
    "run_suites",
    "suite_names",
    "synchronize",
]
