"""pytest-benchmark over the cases of fastdl.bench, so ``pytest benchmarks/`` and ``fastdl bench``
time the same workloads.

A ``bench_<family>.py`` file sets ``BENCH_SUITE = "<suite name>"`` and has a test taking the
``bench_contender`` argument; this file parametrizes it with every (case, contender) of that suite,
one benchmark each, grouped by case. The folder is outside pyproject's testpaths, so the normal
``pytest`` run does not collect it; run it with ``pytest benchmarks/``.

    pytest benchmarks/                          all suites, default shapes
    pytest benchmarks/ --bench-quick            small shapes, a smoke run
    pytest benchmarks/ --bench-device cuda      on the GPU
    pytest benchmarks/ -k "adamw and fastdl"    one contender
    pytest benchmarks/ --bench-quick --benchmark-disable    each case once: a check that they run
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastdl.bench import Case, Contender, default_device, get_suite, synchronize


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastdl bench")
    group.addoption("--bench-quick", action="store_true", help="the small --quick shapes of fastdl bench")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                    help="device to benchmark on (default: cuda if fastdl has CUDA kernels and a GPU "
                         "is visible, else cpu)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # pytest collects only test_*.py by default; bench_*.py files are benchmarks. A file named on the
    # command line is collected by pytest itself, so it is skipped here to avoid collecting it twice.
    is_bench_file = file_path.suffix == ".py" and file_path.name.startswith("bench_")
    if is_bench_file and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config: pytest.Config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or default_device())


def _test_id(case: Case, contender: Contender) -> str:
    # "adamw-fp32-50x200k-torch_fused_True": no spaces or '=' so that -k can select it.
    return f"{case.name}-{re.sub(r'[^A-Za-z0-9.]+', '_', contender.name)}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_contender" not in metafunc.fixturenames:
        return
    suite = get_suite(metafunc.module.BENCH_SUITE)
    cases = suite.cases(metafunc.config.getoption("--bench-quick"), _device(metafunc.config))
    pairs = [(case, contender) for case in cases for contender in case.contenders]
    metafunc.parametrize("bench_contender", pairs, ids=[_test_id(*pair) for pair in pairs])


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    device = _device(pytestconfig)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but torch sees no CUDA device")
    return device


@pytest.fixture
def run_contender(benchmark, bench_device: torch.device) -> Callable[[tuple[Case, Contender]], None]:
    """Set up one contender and time it with pytest-benchmark; GB/s goes into extra_info."""

    def run(bench_contender: tuple[Case, Contender]) -> None:
        case, contender = bench_contender
        step = contender.setup(bench_device)

        def synchronized_step() -> None:
            # Without it, CUDA calls would only be timed as launches.
            step()
            synchronize(bench_device)

        benchmark.group = case.name
        benchmark.extra_info.update(contender=contender.name, is_fastdl=contender.is_fastdl,
                                    bytes_per_step=case.bytes_per_step, description=case.description)
        benchmark(synchronized_step)
        if benchmark.stats is not None:  # None under --benchmark-disable, which calls the step once
            benchmark.extra_info["gb_per_s_median"] = case.bytes_per_step / benchmark.stats.stats.median / 1e9

    return run
