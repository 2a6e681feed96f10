"""Every search test runs on one intra-op thread."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are tiny, so fanning out to threads costs more than it
    saves (on a busy 2-core machine, 100 times more). And several tests hold a sentence's
    results in different batches to 1e-9: with two threads, torch splits some reductions by
    batch size, which changes their rounding (1.2e-7 for the toy model's greedy scores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
