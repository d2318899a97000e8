"""Step counters in every form torch.optim steps: 0-d or of shape [1] (A3C's
shared-memory Adam, ``state["step"] = torch.zeros(1)``), of an integer or
16-bit dtype, a number set by hand; set into a live optimizer's state or
loaded from a checkpoint. A counter the op can read is updated in place
(the one tensor that other processes share); others are made readable
through the step's journal, and one that no optimizer can read is refused
with nothing changed."""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch

import fused_optim
from harness import assert_optimizer_unchanged, snapshot_optimizer
from optim_configs import NOT_IN_TORCH, ONE_PER_OPTIMIZER, STATE_NAMES, torch_class

# torch.optim's classes that keep a per-param counter (SGD keeps none;
# Lion, Lars and Lamb have no torch.optim twin to share checkpoints with).
WITH_COUNTERS = [c for c in ONE_PER_OPTIMIZER
                 if "step" in STATE_NAMES[c.name] and c.name not in NOT_IN_TORCH]

# form -> (the counter holding `count`, whether ours keeps that very tensor)
FORMS = {
    "0-d": (lambda count: torch.tensor(float(count)), True),
    "shape_1": (lambda count: torch.full((1,), float(count)), True),
    "shape_1x1": (lambda count: torch.full((1, 1), float(count)), True),
    "float64_shape_1": (lambda count: torch.full((1,), float(count), dtype=torch.float64), True),
    "int64": (lambda count: torch.tensor(count), False),
    "float16": (lambda count: torch.tensor(float(count), dtype=torch.float16), False),
}


def _model():
    torch.manual_seed(0)
    # (231, 33, 165 and 5 elements: vector bodies and tails)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def _step(model, opt, step, step_fn=None):
    """Step ``step`` of the run: its gradients, then ``step_fn`` (the
    optimizer's step unless given: a compiled one)."""
    torch.manual_seed(1000 + step)
    opt.zero_grad()
    model(torch.randn(6, 7)).square().mean().backward()
    (step_fn or opt.step)()


def _step_both(runs, steps):
    for step in steps:
        for model, opt in runs:
            _step(model, opt, step)


def _pair(cfg):
    """(model, opt) for torch.optim's for-loop step and for ours."""
    runs = []
    for cls, extra in ((torch_class(cfg.name), {"foreach": False}), (cfg.ours_cls, {})):
        model = _model()
        runs.append((model, cls(model.parameters(), **cfg.kwargs, **extra)))
    return runs


def _assert_same_runs(ours, ref):
    (model, opt), (ref_model, ref_opt) = ours, ref
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert list(state) == list(ref_state)
        for key, value in ref_state.items():
            if key == "step":  # (ours float32 where torch keeps an integer or 16-bit dtype)
                assert float(state[key]) == float(value)
            else:
                torch.testing.assert_close(state[key], value, check_dtype=False)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("cfg", WITH_COUNTERS, ids=str)
def test_counter_set_into_the_state_steps_as_torch(cfg, form):
    # Set between steps (the plan is cached): torch counts on from it, and
    # so do we, on the very tensor where the op can read it.
    make, kept = FORMS[form]
    ref, ours = _pair(cfg)
    _step_both((ref, ours), range(2))
    counters = {}
    for model, opt in (ref, ours):
        for p in model.parameters():
            opt.state[p]["step"] = counters[opt, p] = make(2)
    _step_both((ref, ours), range(2, 5))
    _assert_same_runs(ours, ref)
    model, opt = ours
    for p in model.parameters():
        step = opt.state[p]["step"]
        assert float(step) == 5.0
        if kept:
            assert step is counters[opt, p]
        else:
            assert step.dtype == torch.float32 and step.shape == counters[opt, p].shape


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("cfg", WITH_COUNTERS, ids=str)
def test_counter_loaded_from_a_torch_checkpoint_steps_as_torch(cfg, form):
    make, kept = FORMS[form]
    ref, ours = _pair(cfg)
    _step_both((ref,), range(2))
    # (copies: a state_dict holds the live state dicts, and a load keeps
    # tensors that need no cast, so torch's and ours would share them)
    saved = copy.deepcopy(ref[1].state_dict())
    for state in saved["state"].values():
        state["step"] = make(2)
    ours[0].load_state_dict(ref[0].state_dict())
    for _, opt in (ref, ours):
        opt.load_state_dict(copy.deepcopy(saved))
    _step_both((ref, ours), range(2, 5))
    _assert_same_runs(ours, ref)
    for p in ours[0].parameters():
        step = ours[1].state[p]["step"]
        assert float(step) == 5.0
        assert step.shape == make(2).shape
        assert step.dtype == (make(2).dtype if kept else torch.float32)


@pytest.mark.parametrize("number", [2, 2.0], ids=["int", "float"])
@pytest.mark.parametrize("cfg", WITH_COUNTERS, ids=str)
def test_counter_set_as_a_number_is_counted_on(cfg, number):
    # torch.optim's step refuses a number ("API has changed"); ours makes a
    # counter of it (as both loads do) and steps as torch from a tensor.
    ref, ours = _pair(cfg)
    _step_both((ref, ours), range(2))
    for p in ours[0].parameters():
        ours[1].state[p]["step"] = number
    _step_both((ref, ours), range(2, 5))
    _assert_same_runs(ours, ref)
    assert all(type(ours[1].state[p]["step"]) is torch.Tensor for p in ours[0].parameters())


def test_compiled_step_updates_a_counter_of_shape_1_in_place():
    # (Dynamo's own optimizer handling reads every counter with
    # ``.is_cpu``: a number there fails inside torch.compile, as torch's)
    cfg = next(c for c in WITH_COUNTERS if c.name == "Adam")
    ref, ours = _pair(cfg)
    _step_both((ref, ours), range(2))
    counters = []
    for model, opt in (ref, ours):
        for p in model.parameters():
            opt.state[p]["step"] = torch.full((1,), 2.0)
            counters.append(opt.state[p]["step"])
    compiled = torch.compile(ours[1].step)
    for step in range(2, 5):
        _step(*ref, step)
        _step(*ours, step, compiled)
    _assert_same_runs(ours, ref)
    assert all(counter.tolist() == [5.0] for counter in counters)


# A counter no optimizer can read (torch's .item() refuses two elements).
UNREADABLE = {
    "two_elements": (lambda: torch.zeros(2), RuntimeError, "must be a one-element"),
    "a_string": (lambda: "2", TypeError, "incompatible function arguments"),
}


@pytest.mark.parametrize("how", sorted(UNREADABLE))
@pytest.mark.parametrize("cfg", WITH_COUNTERS, ids=str)
def test_unreadable_counter_is_refused_with_nothing_changed(cfg, how):
    make, exception, message = UNREADABLE[how]
    model, opt = _pair(cfg)[1]
    for step in range(2):
        _step(model, opt, step)
    params = list(model.parameters())
    opt.state[params[-1]]["step"] = make()  # (the last param: the others come first in the call)
    snap = snapshot_optimizer(opt)
    with pytest.raises(exception, match=message):
        _step(model, opt, 2)
    assert_optimizer_unchanged(opt, snap, f"{cfg} {how}")


# ----- A3C's shared Adam: one optimizer, its state in shared memory, stepped
# by worker processes ------------------------------------------------------


class _SharedAdamState:
    """As A3C implementations write their shared Adam: the state made by
    hand at construction, then put in shared memory (a mixin, before the
    Adam class it is for: module level, so a spawned worker can unpickle
    it)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = torch.zeros(1)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)

    def share_memory(self):
        for state in self.state.values():
            for tensor in state.values():
                tensor.share_memory_()


class TorchSharedAdam(_SharedAdamState, torch.optim.Adam):
    pass


class OurSharedAdam(_SharedAdamState, fused_optim.Adam):
    pass


def _worker(model, opt, seed, steps):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 7)).square().mean().backward()
        opt.step()


def test_shared_adam_stepped_by_a_worker_process_as_torch():
    # The worker's steps must land in the tensors the parent holds: the
    # counter of shape [1] included, updated in place.
    results = []
    for cls in (TorchSharedAdam, OurSharedAdam):
        torch.manual_seed(0)
        model = torch.nn.Linear(7, 33)
        model.share_memory()
        initial = [p.detach().clone() for p in model.parameters()]
        opt = cls(model.parameters(), lr=1e-2)
        opt.share_memory()
        worker = multiprocessing.get_context("spawn").Process(
            target=_worker, args=(model, opt, 1, 5))
        worker.start()
        worker.join(timeout=120)
        assert worker.exitcode == 0, f"{cls.__name__}: the worker failed"
        for p, start in zip(model.parameters(), initial):
            assert not torch.equal(p, start), f"{cls.__name__}: the worker's steps did not land"
        results.append((model, opt))
    (ref_model, ref_opt), (model, opt) = results
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])
        assert opt.state[p]["step"].tolist() == [5.0]
