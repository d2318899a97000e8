"""Large-model training stacks, in 2 gloo processes on CPU: FSDP2
(``fully_shard``, DTensor params) and tensor parallelism against
torch.optim under the same run, master weights and bf16 state sharded, the
public op on DTensors, and torch.distributed.checkpoint (DCP) both ways
with torch.optim (DDP and FSDP2) and resumed in new processes.

The scenarios are in distributed_worker.py; one pair of processes runs all
of a phase (starting processes is the expensive part) and each test here
checks its scenario's outcome on both ranks.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import distributed_worker  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_phase(phase, tmp):
    mp.spawn(distributed_worker.run, args=(phase, _free_port(), str(tmp)),
             nprocs=distributed_worker.WORLD, join=True)
    outcomes = {}
    for rank in range(distributed_worker.WORLD):
        with open(os.path.join(tmp, f"outcomes-{phase}-{rank}.json")) as f:
            for name, outcome in json.load(f).items():
                outcomes.setdefault(name, {})[rank] = outcome
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    result = _run_phase("main", tmp)
    # new processes, resuming from the checkpoints the main phase saved
    result.update(_run_phase("resume", tmp))
    return result


ALL = [fn.__name__ for phase in ("main", "resume") for fn in distributed_worker.SCENARIOS[phase]]


@pytest.mark.parametrize("name", ALL)
def test_scenario(outcomes, name):
    per_rank = outcomes[name]
    assert set(per_rank) == set(range(distributed_worker.WORLD))
    failures = {rank: text for rank, text in per_rank.items() if text != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{t}" for r, t in failures.items())
