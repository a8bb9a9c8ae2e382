"""Shared test setup: one intra-op thread (the tests use tiny tensors, for which a second thread only adds
synchronisation cost, badly so on a shared 2-core machine) and the same RNG state at the start of every test.

`require_module(name)`: an optional test dependency (transformers, trl, a browser...). Locally a missing one
skips the suite with a reason; in CI (environment variable CI set to anything but "", "0" or "false") it is an
error, so a broken install cannot turn a suite green by skipping it.
"""
import importlib
import os

import pytest
import torch

torch.set_num_threads(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_module(name: str, reason: str | None = None):
    """Import and return module `name`: pytest.importorskip locally, a hard import (ImportError fails the
    collection) in CI."""
    if in_ci():
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
