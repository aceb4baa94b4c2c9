import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_cpu_thread():
    """The tiny models run many small ops: one thread is several times faster than two threads
    waiting on each other, above all on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
