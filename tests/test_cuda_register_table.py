"""scripts/cuda_register_table.py, the register table of csrc/cuda/README.md,
on a log in check_cuda_kernels.sh's format (no nvcc needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_register_table.py"
spec = importlib.util.spec_from_file_location("cuda_register_table", SCRIPT)
cuda_register_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_register_table)

LOG = """\
== compiling 2 files for sm_80, sm_90 (2 jobs)
-- csrc/cuda/sgd.cu sm_80  (registers / spill stores / spill loads / kernel param state)
     40     0     0  SgdOp<false, false> fp32 fp32
     64     4     8  SgdOp<false, false> bf16 bf16
     56     0     0  SgdOp<true, false> fp32 bf16
     30     0     0  step_kernel
-- csrc/cuda/sgd.cu sm_90  (registers / spill stores / spill loads / kernel param state)
     41     0     0  SgdOp<false, false> fp32 fp32
     61     0     0  SgdOp<false, false> bf16 bf16
     55     0     0  SgdOp<true, false> fp32 bf16
-- csrc/cuda/new.cu sm_80  (registers / spill stores / spill loads / kernel param state)
     50     0     0  NewOp<true> fp32 fp32
-- csrc/cuda/new.cu sm_90  (registers / spill stores / spill loads / kernel param state)
     52     0     0  NewOp<true> fp32 fp32
     30     0     0  fused_optim::cuda::tensor_kernel(fused_optim::cuda::ReduceListMeta, fp64 const*, fp64*)
"""


def _table():
    return cuda_register_table.table(cuda_register_table.parse(LOG.splitlines()))


def test_rows_are_the_labelled_kernels_then_the_others_under_their_names():
    rows = [line.split(" | ")[0].lstrip("| ") for line in _table().splitlines()[2:]
            if line.startswith("| ")]
    assert rows == ["sgd", "sgd momentum", "NewOp<true>"]


def test_cells_are_both_archs_with_spills_marked_and_listed():
    lines = _table().splitlines()
    sgd = next(line for line in lines if line.startswith("| sgd |"))
    cells = [c.strip() for c in sgd.strip("|").split("|")][1:]
    pairs = cuda_register_table.PAIRS
    assert cells[pairs.index(("fp32", "fp32"))] == "40 / 41"
    assert cells[pairs.index(("bf16", "bf16"))] == "64 / 61 *"
    # an op without state has no kernel whose state dtype differs
    assert cells[pairs.index(("fp32", "bf16"))] == "-"
    assert "- sgd bf16/bf16: sm_80 4/8 B, sm_90 0/0 B" in lines
    new = next(line for line in lines if line.startswith("| NewOp<true> |"))
    assert "50 / 52" in new
