"""Shared test setup: one intra-op thread (the tests use tiny tensors, for which a second thread only adds
synchronisation cost, badly so on a shared 2-core machine) and the same RNG state at the start of every test."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
