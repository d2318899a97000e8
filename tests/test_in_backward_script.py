"""benchmarks/in_backward.py runs: every implementation is timed and
reported (a few rounds: this checks that it runs, not what it costs)."""

from __future__ import annotations

import re

import pytest

from benchmark_scripts import assert_refused  # (benchmarks/ on sys.path)
import in_backward  # noqa: E402
from interleaved import interleaved_times  # noqa: E402


@pytest.mark.parametrize("optimizer", sorted(in_backward.OPTIMIZERS))
def test_every_implementation_is_timed(optimizer, capsys):
    in_backward.main(["--optimizer", optimizer, "--layers", "2", "--width", "8",
                      "--rounds", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "2 layers of width 8 (4 params, 144 elements)" in out
    rows = re.findall(r"^\| (.+?) \| ([0-9]+) \| ([0-9.]+)x \|$", out, re.MULTILINE)
    assert [row[0] for row in rows] == list(in_backward.IMPLEMENTATIONS)
    assert rows[0][2] == "1.00"
    assert all(int(us) > 0 for _, us, _ in rows)


def test_the_steps_in_backward_update_every_param_and_drop_its_gradient():
    for name, (module, extra, in_bwd) in in_backward.IMPLEMENTATIONS.items():
        step, model = in_backward.make_train_step(module, extra, in_bwd, "adamw", layers=2,
                                                  width=8)
        before = [p.detach().clone() for p in model.parameters()]
        step()
        after = list(model.parameters())
        assert all(not b.equal(a) for b, a in zip(before, after)), name
        assert all(p.grad is None for p in after), name


def test_interleaved_times_rotates_the_order_and_keeps_the_rounds_after_the_warmup():
    calls = []

    def timed(name, seconds):
        return lambda: calls.append(name) or seconds

    times = interleaved_times({"a": timed("a", 1.0), "b": timed("b", 2.0), "c": timed("c", 3.0)},
                              rounds=3, warmup=2)
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    assert calls == list("abc" "bca" "cab" "abc" "bca")


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--warmup", "-1"], ["--layers", "0"],
                                  ["--width", "0"]])
def test_refuses_values_out_of_range(argv):
    assert_refused(in_backward.main, argv)
