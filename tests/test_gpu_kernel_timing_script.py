"""benchmarks/gpu_kernel_timing.py, the GPU check's kernel stage, without a
GPU: its tables (the benchmark's optimizers, hyperparameters and byte
budgets), its command line's refusals, and its refusals to run without CUDA
or without a build.
What it measures runs only on a GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_scripts import assert_refused  # (benchmarks/ on sys.path)
import gpu_kernel_timing  # noqa: E402

import fused_optim
from fused_optim.bench.specs import ALL_OPTIMIZERS, OPTIMIZERS as BENCH_OPTIMIZERS


def test_it_times_the_fused_optimizers_of_the_benchmark_with_their_hyperparameters():
    assert list(gpu_kernel_timing.OPTIMIZERS) == ALL_OPTIMIZERS
    for name, (class_name, hyper, _) in gpu_kernel_timing.OPTIMIZERS.items():
        assert class_name == BENCH_OPTIMIZERS[name].class_name
        assert hyper == BENCH_OPTIMIZERS[name].kwargs
        assert hasattr(fused_optim, class_name)
    # an ideal fp32 pass: param rw 8, grad r 4, each state tensor rw 8
    # (test_bench checks the spec's count against the class's state)
    for name, (_, _, budget) in gpu_kernel_timing.OPTIMIZERS.items():
        assert budget == 8 + 4 + 8 * BENCH_OPTIMIZERS[name].state_tensors, name


def test_every_optimizer_has_its_tensors_per_launch():
    # (the capacity of the op's launch for the state its hyperparameters
    # use: Adam's 48 and SGD-with-momentum's 54 as csrc/cuda/README.md
    # derives them by hand)
    counts = {name: gpu_kernel_timing.tensors_per_launch(name) for name in gpu_kernel_timing.OPTIMIZERS}
    assert counts["adam"] == 48 and counts["sgd"] == 54
    assert all(n > 0 for n in counts.values())


@pytest.mark.parametrize("name", ["lion", "lars", "lamb"])
def test_an_optimizer_torch_lacks_has_no_torch_peer(name):
    with pytest.raises(LookupError, match="torch.optim has no"):
        gpu_kernel_timing.build("torch", name, [], fused_optim)


@pytest.mark.parametrize("argv", [
    ["--optimizers", "adam,nope"],
    ["--optimizers", "clion"],  # (not fused: not timed here)
    ["--layouts", "200y5"],
    ["--repeats", "0"],
    ["--repeats", "-3"],
    ["--impls", "apex"],
])
def test_invalid_values_are_refused(argv):
    assert_refused(gpu_kernel_timing.main, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_without_cuda_it_says_what_it_needs():
    with pytest.raises(SystemExit) as exit_info:
        gpu_kernel_timing.main(["--optimizers", "adam", "--repeats", "1"])
    assert "needs a CUDA GPU" in str(exit_info.value.code)


def test_without_a_build_it_says_to_build_in_place(tmp_path):
    # A checkout with fused_optim's Python files but no compiled module, run
    # with -S so that no installed fused_optim (an editable install's finder
    # included) stands in for it; torch comes from PYTHONPATH.
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "fused_optim", tmp_path / "fused_optim",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(root / "benchmarks" / "gpu_kernel_timing.py", tmp_path / "benchmarks")
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-S", "benchmarks/gpu_kernel_timing.py", "--optimizers", "adam"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": torch_site}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot import the checkout's fused_optim" in result.stderr
    assert "build_ext --inplace" in result.stderr
