"""Runtime tests run torch on one thread: their tensors are tiny, and on a shared 2-core machine
every multi-threaded op waits for a descheduled worker (see docs/int8.md, "Timing")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
