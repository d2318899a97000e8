"""fused_optim.sweep.optuna: every asked trial is told, with the value the
lockstep run measured; pruners stop configurations inside the batch without
changing the others; bad and diverging configurations fail alone; several
processes share one study through its storage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

optuna = pytest.importorskip("optuna")

import fused_optim  # noqa: E402
from fused_optim import sweep  # noqa: E402
from fused_optim.sweep.optuna import best_config, optimize  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY, BATCH = 30, 10, 32
COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL

optuna.logging.set_verbosity(optuna.logging.WARNING)


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return (x[:192], y[:192]), (x[192:], y[192:])


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def space(trial):
    return {"optimizer": trial.suggest_categorical("optimizer", ["Adam", "SGD"]),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}


LRS = [1e-5, 2e-5, 0.01, 0.02, 0.05, 0.08, 0.1, 0.3, 0.5, 1e30, -1.0]


def sgd_space(trial):
    """SGD at the learning rate the test enqueued (``lr`` as a category)."""
    return {"optimizer": "SGD", "lr": trial.suggest_categorical("lr", LRS)}


def enqueued(lrs, **study_args):
    study = optuna.create_study(**study_args)
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    return study


def run_optimize(study, space_fn, batches, k, **overrides):
    train, val = data()
    args = dict(val=val, steps=STEPS, eval_every=EVAL_EVERY, batch_size=BATCH, batches=batches, k=k)
    args.update(overrides)
    return optimize(study, space_fn, model(), train, **args)


def direct_run(configs, seed, **overrides):
    """The same configurations through ``sweep.run`` alone."""
    train, val = data()
    args = dict(val=val, steps=STEPS, eval_every=EVAL_EVERY, batch_size=BATCH, seed=seed)
    args.update(overrides)
    return sweep.run(model(), configs, train, **args)


def trials_of(study):
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_every_trial_is_told_the_value_its_run_measured():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.NopPruner())
    rounds = run_optimize(study, space, batches=2, k=4, seed=5)
    assert len(rounds) == 2 and [len(r.results) for r in rounds] == [4, 4]
    trials = trials_of(study)
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == COMPLETE for t in trials)
    for t in trials:
        result = rounds[t.number // 4].results[t.user_attrs["sweep_index"]]
        assert t.user_attrs["sweep_index"] == t.number % 4
        assert t.value == result.final_val_loss  # exactly: the value is the run's own
        assert t.user_attrs["config"] == {"optimizer": t.params["optimizer"], "lr": t.params["lr"]}
        assert result.config.as_dict() == t.user_attrs["config"]
        assert t.user_attrs["name"] == result.name
        assert t.user_attrs["stop_reason"] == "completed" and t.user_attrs["steps_trained"] == STEPS
        assert sorted(t.intermediate_values) == [10, 20, 30]
        assert t.intermediate_values[30] == t.value
    # Round r runs with seed + r, and reporting to Optuna changes nothing in the training.
    alone = direct_run([c.config for c in rounds[1].results], seed=5 + 1)
    assert [c.val_loss for c in alone.results] == [c.val_loss for c in rounds[1].results]
    assert rounds[0].results[0].config != rounds[1].results[0].config

    cfg = best_config(study)
    assert cfg == study.best_trial.user_attrs["config"] == best_config(study, space)
    assert study.best_value == min(t.value for t in trials)
    net = model()
    optimizer = getattr(fused_optim, cfg["optimizer"])(
        net.parameters(), **{k: v for k, v in cfg.items() if k != "optimizer"})
    before = [p.detach().clone() for p in net.parameters()]
    train, _ = data()
    nn.functional.cross_entropy(net(train[0]), train[1]).backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_same_seeds_same_study():
    values = []
    for _ in range(2):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
        run_optimize(study, space, batches=2, k=2, steps=10)
        values.append([(t.params, t.state, t.value) for t in trials_of(study)])
    assert values[0] == values[1]


class LrAbove(optuna.pruners.BasePruner):
    """Prunes, at its first report, every trial whose lr is above ``limit``."""

    def __init__(self, limit):
        self.limit = limit

    def prune(self, study, trial):
        return trial.last_step is not None and trial.params["lr"] > self.limit


def test_pruned_trials_stop_and_the_others_train_as_without_them():
    lrs = [0.01, 0.3, 0.05, 0.5]
    study = enqueued(lrs, pruner=LrAbove(0.1))
    (result,) = run_optimize(study, sgd_space, batches=1, k=4)
    trials = trials_of(study)
    assert [t.state for t in trials] == [COMPLETE, PRUNED, COMPLETE, PRUNED]
    assert [r.stop_reason for r in result.results] == ["completed", "pruned", "completed", "pruned"]
    for t, r in zip(trials, result.results):
        if t.state == PRUNED:
            assert r.steps_trained == EVAL_EVERY and t.user_attrs["steps_trained"] == EVAL_EVERY
            assert t.user_attrs["stop_reason"] == "pruned"
            assert t.intermediate_values == {EVAL_EVERY: r.val_loss[0]}
            assert t.value == r.val_loss[0]  # Optuna keeps the last report
        else:
            assert t.value == r.final_val_loss and r.steps_trained == STEPS
    # Bit for bit the same as training all four without a pruner, and as the two alone.
    everyone = direct_run([{"optimizer": "SGD", "lr": lr} for lr in lrs], seed=0)
    kept = direct_run([{"optimizer": "SGD", "lr": lr} for lr in (0.01, 0.05)], seed=0)
    for r, full in zip(result.results, everyone.results):
        n = len(r.val_loss)
        assert r.val_loss == full.val_loss[:n] and r.train_loss == full.train_loss[:len(r.train_loss)]
    assert [r.val_loss for r in result.results[::2]] == [r.val_loss for r in kept.results]
    for r, alone in zip(result.results[::2], kept.results):
        assert all(torch.equal(r.state_dict[n], alone.state_dict[n]) for n in alone.state_dict)


class From(optuna.pruners.BasePruner):
    """Prunes every trial once it has reported at ``step``."""

    def __init__(self, step):
        self.step = step

    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= self.step


@pytest.mark.parametrize("step, state, trained", [(20, PRUNED, 20), (STEPS, COMPLETE, STEPS)])
def test_nothing_is_pruned_at_the_last_step(step, state, trained):
    study = enqueued([0.05, 0.02], pruner=From(step))
    (result,) = run_optimize(study, sgd_space, batches=1, k=2)
    assert [t.state for t in trials_of(study)] == [state, state]
    assert [r.steps_trained for r in result.results] == [trained, trained]


def test_median_pruner_prunes_the_laggards_of_the_next_round():
    # MedianPruner compares with COMPLETE trials: none in round 0, four in round 1.
    study = enqueued([0.05, 0.1, 0.02, 0.08, 1e-5, 0.1, 2e-5, 0.05],
                     pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
    rounds = run_optimize(study, sgd_space, batches=2, k=4)
    trials = trials_of(study)
    assert [t.state for t in trials[:4]] == [COMPLETE] * 4
    assert trials[4].state == trials[6].state == PRUNED  # lr 1e-5, 2e-5: barely moved
    assert trials[5].state == COMPLETE  # the best lr
    assert [r.steps_trained for r in rounds[1].results[::2]] == [EVAL_EVERY, EVAL_EVERY]


def test_a_diverging_configuration_fails_alone():
    study = enqueued([0.05, 1e30, 0.02])
    (result,) = run_optimize(study, sgd_space, batches=1, k=3)
    trials = trials_of(study)
    assert [t.state for t in trials] == [COMPLETE, FAIL, COMPLETE]
    assert trials[1].value is None
    assert trials[1].user_attrs["stop_reason"] == "diverged"
    assert "loss" in trials[1].user_attrs["stop_detail"]
    assert trials[1].user_attrs["steps_trained"] == result.results[1].steps_trained < STEPS
    assert [t.value for t in trials[::2]] == [r.final_val_loss for r in result.results[::2]]
    assert all(math.isfinite(t.value) for t in trials[::2])


def test_invalid_configurations_fail_without_training():
    def picky(trial):
        config = sgd_space(trial)
        if config["lr"] == 0.3:
            raise ValueError("no 0.3 here")
        return config

    study = enqueued([0.05, -1.0, 0.3, 0.02, -1.0, 0.3])
    rounds = run_optimize(study, picky, batches=2, k=3)
    trials = trials_of(study)
    assert [t.state for t in trials] == [COMPLETE, FAIL, FAIL, COMPLETE, FAIL, FAIL]
    assert "Invalid learning rate" in trials[1].user_attrs["stop_detail"]
    assert trials[1].user_attrs["config"] == {"optimizer": "SGD", "lr": -1.0}
    assert trials[2].user_attrs["stop_detail"] == "ValueError: no 0.3 here"
    assert all(trials[i].user_attrs["stop_reason"] == "invalid" for i in (1, 2, 4, 5))
    assert all(trials[i].user_attrs["steps_trained"] == 0 for i in (1, 2, 4, 5))
    assert [r.config.kwargs["lr"] for r in rounds[0].results] == [0.05]
    assert trials[0].value == rounds[0].results[0].final_val_loss
    assert [r.config.kwargs["lr"] for r in rounds[1].results] == [0.02]


def test_a_round_with_no_valid_configuration_trains_nothing():
    study = enqueued([-1.0, -1.0])
    (result,) = run_optimize(study, sgd_space, batches=1, k=2)
    assert result.results == []
    assert [t.state for t in trials_of(study)] == [FAIL, FAIL]


def test_an_error_in_training_leaves_no_trial_running():
    def loss_fn(output, target):
        raise RuntimeError("out of memory, say")

    study = enqueued([0.05, 0.02])
    with pytest.raises(RuntimeError, match="out of memory"):
        run_optimize(study, sgd_space, batches=2, k=2, loss_fn=loss_fn)
    trials = trials_of(study)
    assert [t.state for t in trials] == [FAIL, FAIL]  # and round 1 never started
    assert all(t.user_attrs["stop_reason"] == "error" for t in trials)


def test_a_maximizing_study_is_told_the_metric():
    study = enqueued([0.05, 0.3], direction="maximize")
    (result,) = run_optimize(study, sgd_space, batches=1, k=2)
    trials = trials_of(study)
    assert [t.value for t in trials] == [r.final_metric for r in result.results]
    assert all(0 <= t.value <= 1 for t in trials)
    with pytest.raises(ValueError, match="val"):
        run_optimize(study, sgd_space, batches=1, k=2, val=None)
    with pytest.raises(ValueError, match="single-objective"):
        run_optimize(optuna.create_study(directions=["minimize", "minimize"]), sgd_space,
                     batches=1, k=2)


WORKER = """
import json, os, sys, time
import optuna, torch
from torch import nn
from fused_optim.sweep.optuna import optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)
storage, seed, here = sys.argv[1], int(sys.argv[2]), sys.argv[3]
open(os.path.join(here, f"ready-{seed}"), "w").close()  # start together: the rounds overlap
deadline = time.time() + 60
while len([f for f in os.listdir(here) if f.startswith("ready-")]) < 2 and time.time() < deadline:
    time.sleep(0.01)
generator = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=generator)
y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
study = optuna.create_study(study_name="shared", storage=storage, load_if_exists=True,
                            sampler=optuna.samplers.TPESampler(seed=seed),
                            pruner=optuna.pruners.MedianPruner(n_startup_trials=0))

def space(trial):
    return {"optimizer": trial.suggest_categorical("optimizer", ["Adam", "SGD"]),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}

rounds = optimize(study, space, model, (x[:192], y[:192]), val=(x[192:], y[192:]), batches=2,
                  k=3, steps=30, eval_every=10, batch_size=32, seed=seed)
print(json.dumps([[r.config.as_dict() for r in sweep.results] for sweep in rounds]))
"""


def test_two_processes_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # Once, before the workers: the first use of a fresh SQLite file creates its tables, and
    # workers doing that at the same moment collide ("table studies already exists").
    optuna.create_study(study_name="shared", storage=storage)
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), storage, str(seed),
                                 str(tmp_path)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for seed in (1, 2)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = trials_of(study)
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state in (COMPLETE, PRUNED, FAIL) for t in trials)
    assert all(t.state.is_finished() for t in trials)
    configs = sorted(json.dumps(t.user_attrs["config"], sort_keys=True) for t in trials)
    trained = sorted(json.dumps(c, sort_keys=True) for rounds in outputs for rnd in rounds for c in rnd)
    assert configs == trained  # every trial trained in exactly one worker
    for t in trials:
        if t.state == COMPLETE:
            assert sorted(t.intermediate_values) == [10, 20, 30]
            assert t.value == t.intermediate_values[30]
