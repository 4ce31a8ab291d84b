"""Trainer tests: one intra-op thread (the models are tiny; on a shared 2-core machine OpenMP's
barriers cost ~40x a step)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
