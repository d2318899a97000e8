"""Shared pytest configuration.

DEVICES is the one place that decides where the kernels are tested: the CPU
always, CUDA when both torch and our build support it. Tests that take a
`device` argument are parametrized over it (no scattered skips).
"""

from __future__ import annotations

import pytest
import torch

import fused_optim

DEVICES = ["cpu"]
if torch.cuda.is_available() and fused_optim.cuda_built():
    DEVICES.append("cuda")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed_and_restore_threads():
    """Every test starts from the same RNG state and thread count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # torch.optim's own sparse Adagrad path builds COO tensors without opting
    # in or out of invariant checks; the warning is torch's, not ours.
    config.addinivalue_line("filterwarnings", "ignore:Sparse invariant checks:UserWarning")
