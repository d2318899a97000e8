"""benchmarks/first_step.py runs: every implementation, from each checkout
given, is timed and reported (one round of `tiny`: this checks that it
runs, not what it costs), and bad values are refused before anything
runs."""

from __future__ import annotations

import pathlib
import re

import pytest

from benchmark_scripts import assert_refused  # (benchmarks/ on sys.path)
import first_step  # noqa: E402

CHECKOUT = str(pathlib.Path(__file__).resolve().parents[1])


def _rows(out: str) -> list:
    return re.findall(r"^\| (\w+) \| ([\w-]+) \| ([0-9. |]+) \|$", out, re.MULTILINE)


def test_every_implementation_is_timed(capsys):
    first_step.main(["--optimizers", "sgd,adam", "--workloads", "tiny", "--rounds", "1"])
    out = capsys.readouterr().out
    assert f"fused_optim: {CHECKOUT}\n" in out
    header = next(line for line in out.splitlines() if line.startswith("| optimizer"))
    assert header.startswith("| optimizer | workload | fused_optim (us) | torch-fused (us) | "
                             "torch-foreach (us) | fused_optim / torch-fused |")
    rows = _rows(out)
    assert [(opt, workload) for opt, workload, _ in rows] == [("sgd", "tiny"), ("adam", "tiny")]
    for _, _, cells in rows:
        us = [float(cell) for cell in cells.split(" | ")]
        assert len(us) == 4 and all(value > 0 for value in us[:3])
        assert us[3] == pytest.approx(us[0] / us[1], rel=0.02, abs=0.01)


def test_two_checkouts_are_timed_side_by_side(capsys):
    first_step.main(["--optimizers", "sgd", "--workloads", "tiny", "--rounds", "1",
                     "--checkouts", f"{CHECKOUT},{CHECKOUT}"])
    out = capsys.readouterr().out
    assert f"fused_optim@0: {CHECKOUT}\nfused_optim@1: {CHECKOUT}" in out
    assert "| fused_optim@1 / fused_optim@0 |" in out
    (_, _, cells), = _rows(out)
    assert len(cells.split(" | ")) == 4 + 3


@pytest.mark.parametrize("argv", [
    ["--rounds", "0"],
    ["--optimizers", "adamax"],
    ["--workloads", "large"],
    ["--checkouts", "/nonexistent"],
])
def test_bad_values_are_refused(argv):
    assert_refused(first_step.main, argv)
