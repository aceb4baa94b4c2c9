import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_cpu_thread():
    """Tiny models run many small ops: one thread beats two threads waiting on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
