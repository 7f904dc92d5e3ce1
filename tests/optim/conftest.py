"""Optimizer and init tests: one thread, a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Models this small run many times faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
