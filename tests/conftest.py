"""Shared set-up for the tests under tests/ (test_eco.py at the top holds the tests that prove the method):
the repository's modules importable from here, and Triton's interpreter on machines without a GPU."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "data")):  # the flat repository's modules and data/prepare.py
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402

import prepare  # noqa: E402  data/prepare.py


def repo_text(*names):
    """Text for small data sets: the repository's own source files."""
    return "".join(open(os.path.join(ROOT, name)).read() for name in names)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data folder prepared offline from the repository's own code (a 300-token BPE: fast): its path."""
    root = tmp_path_factory.mktemp("data")
    (root / "input.txt").write_text(repo_text("eco.py", "quant.py", "model.py"))
    prepare.prepare(str(root / "tiny"), str(root / "input.txt"), vocab_size=300)
    return root / "tiny"


def tiny_args(data_dir, out_dir, *extra):
    """train.py options for a run of seconds: a one-layer model of width 32, 6 steps, evaluated at 3 and 6."""
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--max_steps=6", "--eval_interval=3", "--eval_batches=2",
            "--log_interval=3", "--sample_tokens=0", *extra]
