"""Shared pytest set-up: one torch thread (2 shared cores), opt-in slow tests, CPU unless a CUDA test."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _cpu_unless_a_cuda_test(request, monkeypatch):
    """Outside tests/test_cuda.py the suite runs on the CPU also on a machine with a GPU: its assertions (bit-exact
    resume, the trainer's metrics = eval.py's) are about the CPU kernels, and 'auto' devices would pick the GPU.
    Subprocesses (torchrun, the CLI tools) get no visible GPU either."""
    if request.node.path.name != "test_cuda.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
