"""One CPU thread for the tiny models of the tests: they run many small ops, and two threads only wait
on each other, above all on a busy 2-core machine. Each conftest wraps it as a fixture of its scope."""
from __future__ import annotations

from collections.abc import Iterator

import torch


def single_cpu_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
