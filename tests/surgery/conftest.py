import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The rewrites are a few large matmuls; on the shared 2-core machine one thread avoids oversubscription
    (measured: the smollm2 rotation takes several times longer with the default thread count under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
