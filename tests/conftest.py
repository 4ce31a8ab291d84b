"""Shared test setup: device fixtures, the `cuda` / `slow` markers, and a fixed seed per test.

`pytest -q` runs the CPU tests; tests marked `cuda` run only where torch sees a GPU *and* fastdl._C
was compiled with CUDA, and tests marked `slow` only with `--runslow`.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fastdl


def cuda_available() -> bool:
    """A GPU is visible and the extension has CUDA kernels to run on it."""
    return torch.cuda.is_available() and bool(fastdl.build_info()["cuda"])


# The devices a device-parametrized test runs on; the cuda one carries the marker so that
# `-m "not cuda"` deselects it and the collection hook below skips it on CPU-only machines.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml declares these too; repeating them keeps `--strict-markers` working when pytest
    # runs with another rootdir / ini file (e.g. `pytest -c /dev/null tests`).
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; run with --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and fastdl built with CUDA")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    has_cuda = cuda_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every available device: cpu always, cuda when present (the cuda case is skipped otherwise)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch from the test id: each test (and each parametrization) draws its own random
    inputs, and draws the same ones on every run, so a failure reproduces with the same numbers."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed
