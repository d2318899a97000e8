"""benchmarks/step_after_backward.py runs: it swaps the kept call's gradient
read (fused_optim/_kept_calls.py) for its A/B, so a change there must keep
it working, and it puts the read back. Timed with a few rounds only: this
checks that every implementation runs and is reported, not what it costs."""

from __future__ import annotations

import re

import pytest

from fused_optim import _kept_calls

from benchmark_scripts import assert_refused  # (benchmarks/ on sys.path)
import step_after_backward  # noqa: E402


@pytest.mark.parametrize("optimizer", sorted(step_after_backward.OPTIMIZERS))
def test_every_implementation_is_timed(optimizer, capsys):
    gradients = _kept_calls.OneCall.gradients
    step_after_backward.main(["--optimizer", optimizer, "--rounds", "2", "--warmup", "1",
                              "--tensors", "3", "--numel", "40"])
    assert _kept_calls.OneCall.gradients is gradients  # (put back)
    rows = re.findall(r"^\| (.+?) \| ([0-9]+) \| ([0-9.]+)x \|$", capsys.readouterr().out, re.MULTILINE)
    assert [name for name, _, _ in rows] == [
        "ours", "ours, grads in Python", "torch fused", "torch foreach", "torch for-loop"]
    # Each ratio is that row's median over ours (rounding both ways allowed).
    ours = int(rows[0][1])
    for _, median_us, ratio in rows:
        low, high = (int(median_us) - 0.5) / (ours + 0.5), (int(median_us) + 0.5) / max(ours - 0.5, 0.5)
        assert low - 0.005 <= float(ratio) <= high + 0.005, rows


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--warmup", "-1"], ["--tensors", "0"]])
def test_refuses_values_out_of_range(argv):
    assert_refused(step_after_backward.main, argv)
