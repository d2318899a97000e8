"""``python -m fused_optim.sweep``: a user error stops the command before
any training with a one-line message (exit 2), and a small run writes its
files, the ranking over initializations included."""

from __future__ import annotations

import json

import pytest

from fused_optim.sweep import __main__ as cli


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("python -m fused_optim.sweep: error: ")
    return message


@pytest.mark.parametrize("argv,expected", [
    (["--k", "0"], "argument --k: must be at least 1"),
    (["--steps", "-1"], "argument --steps: must be at least 1"),
    (["--eval-every", "0"], "argument --eval-every: must be at least 1"),
    (["--init-seeds", "0"], "argument --init-seeds: must be at least 1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["--space", "no-such-file"], "is neither 'optimizers', 'lr-range:NAME' nor a file"),
    (["--space", "lr-range:Nope"], "NAME must be one of SGD, Adagrad"),
    (["--k", "4"], "--k sets the size of an lr-range space"),
    (["--space", "lr-range:SGD", "--lrs", "2"], "--lrs applies to the 'optimizers' space"),
    (["--halving", "soon"], "--halving must be 'none', 'auto' or comma-separated steps"),
    (["--halving", "10,3000", "--steps", "3000"], "every rung must come before the last step"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_before_training(capsys, argv, expected):
    assert expected in _refused(capsys, argv)


@pytest.mark.parametrize("content,expected", [
    ("[", "not a JSON file"),
    ('{"optimizer": "Adam"}', "must hold a list of configuration dicts, not a dict"),
    ("[]", "no configurations to train"),
    ('[{"optimizer": "Adam", "lr": -1}]', "Invalid learning rate: -1"),
    ('[{"optimizer": "Adam", "foo": 1}]', "Adam takes no argument 'foo'"),
])
def test_bad_space_files_are_refused_before_training(capsys, tmp_path, content, expected):
    space = tmp_path / "space.json"
    space.write_text(content)
    assert expected in _refused(capsys, ["--space", str(space)])


def test_unwritable_out_and_too_large_batch_are_refused(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "--out" in _refused(capsys, ["--out", str(blocker / "results")])
    assert "the training split holds" in _refused(
        capsys, ["--batch-size", "100000", "--out", str(tmp_path / "out")])


def test_small_run_writes_its_files_with_the_ranking_over_initializations(capsys, tmp_path):
    out = tmp_path / "deep" / "results"
    cli.main(["--model", "mlp", "--space", "lr-range:adamw", "--k", "2", "--steps", "4",
              "--eval-every", "2", "--init-seeds", "2", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "over 2 initializations" in printed
    leaderboard = (out / "leaderboard.md").read_text()
    assert "Over 2 initializations (ranked by the mean)" in leaderboard
    results = json.loads((out / "results.json").read_text())
    assert results  # (written, parseable)
    assert (out / "best_state_dict.pt").is_file()
