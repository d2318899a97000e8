"""What one CUDA launch carries (fused_optim._C.launch_capacities, computed
from csrc/cuda/multi_tensor_plan.h in any build): the figures of
csrc/cuda/README.md ("Tensors per launch") are the code's, and follow the
formula the README derives."""

from __future__ import annotations

import os
import sys

from fused_optim import _C, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_launch_table  # noqa: E402

# Ops whose launch carries more than the README's base formula counts:
# a scalar-state address per tensor (NAdam), a norms' position per tensor
# and the norms' fields per launch (LARS, LAMB).
WITH_EXTRAS = {"nadam_", "lars_", "lamb_"}


def test_the_readme_table_is_the_codes():
    with open(os.path.join(ROOT, "csrc", "cuda", "README.md")) as f:
        readme = f.read()
    assert cuda_launch_table.table(_C.launch_capacities()) in readme, (
        "csrc/cuda/README.md's table of tensors per launch is stale: paste the output of "
        "`python scripts/cuda_launch_table.py`")


def test_every_op_has_a_row_per_set_of_state_lists_and_each_launch_fits():
    rows = _C.launch_capacities()
    assert {r["op"] for r in rows} == set(_ops.OP_NAMES)
    for r in rows:
        assert r["operands"] == 2 + len(r["state_lists"])
        assert 0 < r["tensors"] and 4 <= r["slots"] <= 16
        assert r["meta_bytes"] <= 4096  # (the kernel parameter space)
    # Adam with and without amsgrad; SGD with and without momentum buffers
    assert [r["operands"] for r in rows if r["op"] == "adam_"] == [4, 5]
    assert [r["state_lists"] for r in rows if r["op"] == "sgd_"] == [[], ["momentum_buffers"]]


def test_the_readme_formula_gives_the_plain_ops_capacities():
    # slots = 640 // sizeof(Hyper) within [4, 16]; fixed = slots x
    # (sizeof(Hyper) + 1) + 71; tensors = (4096 - fixed) // (8 kN + 39)
    for r in _C.launch_capacities():
        if r["op"] in WITH_EXTRAS:
            continue
        slots = min(16, max(4, 640 // r["hyper_bytes"]))
        fixed = slots * (r["hyper_bytes"] + 1) + 71
        assert (r["slots"], r["tensors"]) == (slots, (4096 - fixed) // (8 * r["operands"] + 39)), r

