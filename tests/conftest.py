"""Settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run each test module on one torch thread.

    The problems are small: threads only add overhead, and on a shared 2-core machine
    oversubscription made the many small CG steps crawl (10x measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
