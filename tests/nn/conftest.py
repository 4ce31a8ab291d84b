import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The modules under test here are tiny, and with two threads each op's fork/join costs more than its
    math. On the loaded 2-core CI machine: tests/nn ran in 6 s on one thread and 37 s on two, and 120 GPT
    training steps in 2 s and 43 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
