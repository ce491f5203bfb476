"""One torch thread for the downstream tests: tiny models on a shared 2-core machine run faster without
OpenMP's thread hand-offs."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
