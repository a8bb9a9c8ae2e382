"""Shared test setup: one intra-op thread (the tests use tiny tensors, for which a second thread only adds
synchronisation cost, badly so on a shared 2-core machine) and the same RNG state at the start of every test.

`require_module(name)` (tests/requires.py `require`): an optional test dependency (transformers, trl, a browser...). Locally a missing one
skips the suite with a reason; in CI (environment variable CI set to anything but "", "0" or "false") it is an
error, so a broken install cannot turn a suite green by skipping it.
"""
import os

import pytest
import torch

from requires import in_ci, require as require_module  # noqa: F401  (tests import them from here too)

# one thread by default (what the suite was written and timed for); NANOSEEK_TEST_THREADS=2 runs the tests through
# the multi-thread paths (e.g. the lean decode step's batch-1 row blocks)
torch.set_num_threads(int(os.environ.get("NANOSEEK_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
