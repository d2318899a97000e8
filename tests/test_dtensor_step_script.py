"""benchmarks/dtensor_step.py runs: every implementation is timed and
reported (a few rounds: this checks that it runs, not what it costs)."""

from __future__ import annotations

import re

import pytest
import torch.distributed as dist

from benchmark_scripts import assert_refused  # (benchmarks/ on sys.path)
import dtensor_step  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip"])
def test_every_implementation_is_timed(clip, capsys):
    dtensor_step.main(["--optimizer", "adam", "--tensors", "3", "--rounds", "2", "--warmup", "1"]
                      + (["--clip"] if clip else []))
    assert not dist.is_initialized()  # (its own group, destroyed)
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([0-9]+) \| ([0-9.]+) \| ([0-9.]+)x \|$", out, re.MULTILINE)
    assert [row[0] for row in rows] == list(dtensor_step.IMPLEMENTATIONS)
    assert ("clipped" in out) == clip
    for _, median_us, per_tensor_us, _ in rows:
        assert abs(float(per_tensor_us) - int(median_us) / 3) <= 0.5 / 3 + 0.005, rows


@pytest.mark.parametrize("optimizer", sorted(dtensor_step.OPTIMIZERS))
def test_every_optimizer_runs(optimizer, capsys):
    # An implementation that cannot step DTensors (torch's fused SGD and
    # Adagrad: no sharding rule) is reported, not timed; ours always is.
    dtensor_step.main(["--optimizer", optimizer, "--tensors", "2", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    timed = re.findall(r"^\| (.+?) \| [0-9]+ \|", out, re.MULTILINE)
    skipped = re.findall(r"^(.+?): not timed, it cannot step DTensors here", out, re.MULTILINE)
    assert timed[:2] == ["ours", "ours, plain params"]
    assert sorted(timed + skipped) == sorted(dtensor_step.IMPLEMENTATIONS)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--warmup", "-1"], ["--tensors", "0"],
                                  ["--tensors", "2001"]])
def test_refuses_values_out_of_range(argv):
    assert_refused(dtensor_step.main, argv)
