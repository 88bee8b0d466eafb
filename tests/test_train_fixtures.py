"""Fixtures the tests of hpcllm.train share (imported by name into each test_train_* module)."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def warm_kernel_cache():
    """Overrides conftest's tokenizer warm-up: training on embeddings never tokenizes."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny problems on a shared 2-core machine: one thread, no spinning thread pool (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
