import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests check numerics, not speed: on one thread they stay fast on a shared, busy machine, where
    two OpenMP threads spin-wait on each other in every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
