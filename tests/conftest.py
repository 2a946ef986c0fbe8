"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread: tiny tensors gain nothing from more, and two shared cores oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def root_logging_restored():
    """The root logger's handlers and level as before each test: a Hydra app run in-process configures logging with
    handlers on the test's captured stdout, which later tests' log records would hit once that capture is closed."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
