"""benchmarks/step_breakdown.py runs: it reaches into the step's internals
(the plan, its kept calls, the op call), so a change there must keep it
working. Timed with a few calls only: this checks that every piece runs
and is reported, not what it costs."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import step_breakdown  # noqa: E402


@pytest.mark.parametrize("optimizer", sorted(step_breakdown.OPTIMIZERS))
def test_every_piece_is_timed(optimizer, capsys):
    step_breakdown.main(["--optimizer", optimizer, "--tensors", "3", "--numel", "40", "--calls", "2"])
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", capsys.readouterr().out, re.MULTILINE)
    labels = [label.strip() for label, _ in rows]
    assert labels[:2] == ["step()", "step body (no wrapper)"]
    assert "the op (_C fast call)" in labels
    assert any(label.startswith("torch.optim") for label in labels)  # (a peer ran)
    assert all(float(us) > 0 for _, us in rows)
