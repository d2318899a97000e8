"""Optuna drives the search, the lockstep trains: each round asks the study
for ``k`` trials, trains their configurations as one lockstep batch, and
tells the study how each ended::

    import optuna
    from fused_optim import sweep
    from fused_optim.sweep.optuna import best_config, optimize

    def space(trial):
        return {"optimizer": trial.suggest_categorical("optimizer", ["Adam", "SGD"]),
                "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner())
    optimize(study, space, model, train=(x, y), val=(x_val, y_val), batches=8, k=16)
    best = sweep.make_config(best_config(study))
    optimizer = best.optimizer_class(model.parameters(), **best.kwargs)

Why ask-and-tell rather than ``study.optimize(objective)``: an objective
trains one trial at a time; here ``k`` trials share each forward, backward
and fused optimizer call, so the study sees a batch of ``k`` concurrent
trials, as it would see ``k`` workers. Two consequences:

- Samplers propose the ``k`` trials of a round before any of them is told,
  from the same observations. TPE keeps them apart with ``constant_liar``
  (the default since Optuna 5; pass ``constant_liar=True`` before that, or
  the round's trials cluster); random, QMC and grid samplers do not care.
- Pruning happens inside the batch: after each evaluation (every
  ``eval_every`` steps) every configuration still training reports to its
  trial, then those whose ``trial.should_prune()`` is true stop (the rest
  continue bit for bit as if they had never been there, see ``lockstep``).
  ``MedianPruner`` and ``PercentilePruner`` compare with COMPLETE trials
  only, so they prune nothing in a study's first round; successive halving
  and Hyperband (``min_resource`` in steps, ``max_resource=steps``) also
  rank the running trials of the same round. Nothing is pruned at the last
  step: the training is already paid for, and a COMPLETE trial informs the
  sampler more than a PRUNED one.

What is reported and told follows the study's direction: ``minimize``, the
validation loss (the final training loss, mean of its last 10% of steps,
without ``val``: ``ConfigResult.score``); ``maximize``, the validation
``metric`` (``val`` is then required). Multi-objective studies are refused
(Optuna cannot prune them). Each trial ends as:

- COMPLETE with that value when its configuration trained to the end;
- PRUNED when the pruner stopped it (Optuna records its last report);
- FAIL when it diverged (training loss NaN or inf), ended with a value that
  is not finite, or ``space`` raised or returned a configuration that
  ``make_config`` rejects (it does not train; the others do; ``space``
  raising ``optuna.TrialPruned`` makes it PRUNED instead). Samplers
  ignore failed trials: a divergent learning rate teaches TPE nothing, so
  give the space bounds that mostly train.

Before it is told, each trial gets user attributes: ``config`` (the dict
``space`` returned, JSON-friendly), ``name``, ``stop_reason``
(``completed``, ``pruned``, ``diverged``, ``invalid``, ``non-finite``, or
``error`` when an exception ended the round: no trial is left RUNNING),
``stop_detail``, ``steps_trained`` and ``sweep_index`` (its ``index`` in its
round's ``SweepResult``).

Processes and machines: give every worker the same study on an RDB storage
and call ``optimize`` in each; ``ask`` hands out distinct trials, pruners
read every worker's reports from the storage::

    study = optuna.create_study(study_name="adam-vs-sgd", storage="sqlite:///sweep.db",
                                load_if_exists=True)

Create the study once (``optuna create-study``, or one process) before
starting the workers: the first use of a fresh SQLite file creates its
tables, and workers that do it at the same moment collide ("table studies
already exists", "UNIQUE constraint failed: alembic_version"). Give the
workers' samplers different seeds (or none), and prefer a server database
(PostgreSQL, MySQL) beyond a handful of workers. Optuna is optional:
``pip install optuna``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math

import torch.nn.functional as F

from fused_optim.sweep.results import COMPLETED, DIVERGED, PRUNED, SweepResult
from fused_optim.sweep.space import json_value, make_config
from fused_optim.sweep.trainer import run

try:
    import optuna
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
except ImportError as error:  # pragma: no cover (optional dependency)
    raise ImportError("fused_optim.sweep.optuna needs Optuna: pip install optuna") from error

_logger = logging.getLogger(__name__)

INVALID, NON_FINITE = "invalid", "non-finite"


def optimize(study: optuna.Study, space, model, train, *, batches: int, k: int, val=None,
             loss_fn=F.cross_entropy, steps: int = 300, batch_size: int = 64,
             eval_every: int = 50, metric="accuracy", seed: int = 0, device=None,
             progress: bool = False) -> list[SweepResult]:
    """Runs ``batches`` rounds of ``k`` trials of ``study``, each round one
    lockstep ``run`` (see the module docstring).

    Args:
        study: a single-objective Optuna study (its sampler and pruner decide).
        space: ``space(trial) -> configuration dict`` (``fused_optim.sweep.space``),
            drawing every value it varies with ``trial.suggest_*``.
        model, train, val, loss_fn, steps, batch_size, eval_every, metric,
            device, progress: as for ``fused_optim.sweep.run``. Pass an
            ``nn.Module`` (not a factory) for every round to start from the
            same weights, so that trials of different rounds compare fairly.
        batches: rounds to run; ``k``: trials per round.
        seed: round ``r`` runs with ``seed + r`` (batch order, dropout): rounds
            differ and the same call repeats itself.

    Returns one ``SweepResult`` per round, listing the round's configurations
    that trained, in the order their trials were asked (empty when none of
    them was valid).
    """
    if batches < 1 or k < 1:
        raise ValueError(f"optimize needs batches >= 1 and k >= 1, got {batches}, {k}")
    if len(study.directions) != 1:
        raise ValueError("optimize needs a single-objective study (Optuna cannot prune others)")
    maximize = study.direction == StudyDirection.MAXIMIZE
    if maximize and (val is None or metric is None):
        raise ValueError("a study that maximizes is told the validation metric: give val and metric")

    def objective(result) -> float:
        if maximize:
            return result.final_metric
        return result.final_val_loss if result.val_loss else result.final_train_loss

    rounds = []
    for r in range(batches):
        trials = [study.ask() for _ in range(k)]
        told: set = set()
        try:
            valid, specs = [], []  # the trials that train, and their configurations
            for trial in trials:
                try:
                    spec = space(trial)
                    trial.set_user_attr("config", _jsonable(spec))
                    config = make_config(spec, trial.number)
                except Exception as error:  # noqa: BLE001 (any bad configuration fails its trial only)
                    detail = f"{type(error).__name__}: {error}"
                    if isinstance(error, optuna.TrialPruned):  # Optuna's way to skip a point
                        _finish(study, trial, TrialState.PRUNED, None, PRUNED, detail, 0)
                    else:
                        _finish(study, trial, TrialState.FAIL, None, INVALID, detail, 0)
                    told.add(trial.number)
                    continue
                trial.set_user_attr("name", config.name)
                trial.set_user_attr("sweep_index", len(valid))
                valid.append(trial)
                specs.append(spec)

            def pruner(step: int, alive: list) -> list[int]:
                for result in alive:  # all report first, so each should_prune sees the others
                    value = objective(result)
                    if math.isfinite(value):
                        valid[result.index].report(value, step)
                if step >= steps:
                    return []
                return [result.index for result in alive if valid[result.index].should_prune()]

            if not valid:
                rounds.append(SweepResult([], steps=steps))
                continue
            sweep = run(model, specs, train, loss_fn=loss_fn, val=val, steps=steps,
                        batch_size=batch_size, eval_every=eval_every, metric=metric,
                        pruner=pruner, seed=seed + r, device=device, progress=progress)
            for trial, result in zip(valid, sweep.results):
                state, value, reason = _outcome(result, objective(result))
                _finish(study, trial, state, value, reason, result.stop_detail, result.steps_trained)
                told.add(trial.number)
            rounds.append(sweep)
        except BaseException as error:  # interrupted or crashed: no trial stays RUNNING
            for trial in trials:
                if trial.number not in told:
                    with contextlib.suppress(Exception):  # (the error to raise is the first one)
                        trial.set_user_attr("stop_reason", "error")
                        trial.set_user_attr("stop_detail", f"{type(error).__name__}: {error}")
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    return rounds


def best_config(study: optuna.Study, space=None) -> dict:
    """The configuration dict of the study's best trial, ready for
    ``sweep.run`` or ``sweep.make_config`` (whose ``.kwargs`` are the class's
    keyword arguments, without ``optimizer`` and the run keys).

    Read from the trial's ``config`` user attribute, which went through JSON
    (tuples come back as lists, dtypes and callables as their names); given
    ``space``, rebuilt exactly instead, by calling it on the trial's
    parameters (``optuna.trial.FixedTrial``)."""
    best = study.best_trial
    if space is not None:
        return space(optuna.trial.FixedTrial(best.params, best.number))
    if "config" not in best.user_attrs:
        raise KeyError(f"trial {best.number} has no 'config' user attribute "
                       "(not run by fused_optim.sweep.optuna.optimize)")
    return dict(best.user_attrs["config"])


def _outcome(result, value: float) -> tuple:
    if result.stop_reason == DIVERGED:
        return TrialState.FAIL, None, DIVERGED
    if result.stop_reason != COMPLETED:  # pruned (or halved)
        return TrialState.PRUNED, None, result.stop_reason
    if not math.isfinite(value):
        return TrialState.FAIL, None, NON_FINITE
    return TrialState.COMPLETE, value, COMPLETED


def _finish(study, trial, state, value, reason: str, detail: str, steps_trained: int) -> None:
    """Records why and when the trial stopped (user attributes: they can
    only be set while it runs), then tells the study."""
    trial.set_user_attr("stop_reason", reason)
    trial.set_user_attr("stop_detail", detail)
    trial.set_user_attr("steps_trained", steps_trained)
    if state == TrialState.FAIL:
        _logger.warning("trial %d failed (%s%s)", trial.number, reason, f": {detail}" if detail else "")
    study.tell(trial, value, state=state)


def _jsonable(spec) -> object:
    """The configuration as an RDB storage can keep it (``json_value``, and
    ``repr`` for anything else)."""
    if not isinstance(spec, dict):
        return repr(spec)
    out = {}
    for key, value in spec.items():
        value = json_value(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        out[str(key)] = value
    return out
