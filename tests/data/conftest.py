import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are small: on the loaded 2-core CI machine two threads made building 64 shapes
    images take 1 s instead of 2 ms (fork/join per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
