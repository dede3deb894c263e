"""Shared set-up for the tests under tests/ (test_eco.py at the top holds the tests that prove the method):
Triton's interpreter on machines without a GPU, the repository's modules importable (tests/reference.py puts
them on sys.path), and the fixtures several files use."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402

from reference import prepare_small_data  # noqa: E402


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data folder prepared offline from the repository's own code (a 300-token BPE: fast): its path."""
    return prepare_small_data(tmp_path_factory.mktemp("data"))
