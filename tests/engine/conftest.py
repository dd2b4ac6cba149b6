"""Engine tests run torch on one thread: the CI machine has 2 cores shared by parallel work, and
multi-threaded tiny ops under contention are 10-50x slower than single-threaded ones."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
