"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread while a test runs (restored afterwards): tiny models only pay
    synchronisation for more. Files with tiny in-process models use it for every test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
