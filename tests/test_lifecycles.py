"""Random training lifecycles against torch.optim (hypothesis).

test_parity.py steps fixed configurations through one change at a time,
and test_properties.py draws the options and numbers of a plain loop. Here
a draw is a whole lifecycle: an optimizer with random options over random
param groups (float32, float64 and complex params, transposed, 0-d and
empty ones; now and then a group that ours steps with torch.optim's own
code, ``fused=False`` or ``differentiable=True``), then a random sequence
of what training code does between steps:

- gradients missing for some params, or kept from the last step after
  ``zero_grad(set_to_none=False)``;
- an lr (a float, or a tensor filled in place), ``maximize``,
  ``weight_decay`` or decay style changed in a group, or an LR scheduler
  stepping after each step;
- a mode that needs more state turned on in a group (Adam's ``amsgrad``,
  RMSprop's ``centered`` or ``momentum``, SGD's ``momentum``): torch.optim's
  Adam and RMSprop raise ``KeyError`` for the state they lack, so theirs is
  made as zeros before the step, which is what ours makes;
- ``add_param_group``;
- a checkpoint round trip into new optimizers, torch.optim's or ours
  loading either's ``state_dict()``, through ``torch.save`` or not.

A lifecycle runs plain, under ``GradScaler`` (with inf/NaN steps; ours
unscaling in its step or letting the scaler unscale), with
``max_grad_norm`` (torch.optim clips in float64 before its step), with
sparse gradients (SGD, Adagrad), or with ``master_weights=True`` over
bfloat16 or float16 params (torch.optim steps float32 params from the same
values and gradients: our master copies and state must follow it, our
params be it rounded). After every step the params, every state tensor and
the group keys must equal torch.optim's for-loop.

Lifecycles like these found what the fixed tests had not, each now
with a test of its own: a mode turned on while a param had no gradient
failed at that param's next gradient (test_parity.
test_mode_turned_on_mid_run); torch's sparse add wrote packed state at the
wrong place (test_sparse_complex.test_coalesced_sparse_grads_into_packed_state);
SGD's sparse steps that torch's code refuses after writing the momentum
buffer wrote it too (test_errors.test_sparse_grad_*_rejected_atomically).

Examples are derandomized (the same ones every run); EXAMPLES run in CI.
Set FUSED_OPTIM_HYPOTHESIS_EXAMPLES to run more.
"""

from __future__ import annotations

import copy
import io
import os
import random

import pytest
import torch
from torch.testing import assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fused_optim  # noqa: E402
from harness import assert_optimizer_unchanged, assert_same_state, snapshot_optimizer  # noqa: E402
from optim_configs import (  # noqa: E402
    MODE_STATE_MADE_AS_ZEROS,
    MODES_TURNED_ON,
    NOT_IN_TORCH,
    OPTIMIZER_NAMES,
    ROW,
    SPARSE_OK,
    STATE_OF_MODE,
    torch_class,
)

EXAMPLES = int(os.environ.get("FUSED_OPTIM_HYPOTHESIS_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    # (cycles momentum or beta1 too, where the optimizer has them: SGD's
    # momentum turned on from 0, Adam's betas a new tuple every step)
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=30,
        cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults),
}
# Group keys that are ours alone: the options set only on ours here, and
# timm's per-group LAMB step, which a reference loading our checkpoint keeps.
OUR_GROUP_KEYS = {"max_grad_norm", "master_weights", "step"}


class _RandomChooser:
    """A row's Chooser over ``r`` (optim_configs.Chooser)."""

    def __init__(self, r: random.Random) -> None:
        self.r = r

    def choice(self, values):
        return self.r.choice(values)

    def chance(self, p: float) -> bool:
        return self.r.random() < p


def random_options(name: str, r: random.Random) -> dict:
    """Some of the optimizer's options, drawn (the rest at defaults)."""
    o = {}
    if r.random() < 0.7:
        o["lr"] = r.choice([1e-3, 0.01, 0.05])
    if r.random() < 0.4:
        o["weight_decay"] = r.choice([0.0, 0.05])
    if r.random() < 0.3:
        o["maximize"] = r.random() < 0.5
    ROW[name].lifecycle_options(_RandomChooser(r), o)
    return o


def random_param(r: random.Random, gen: torch.Generator, dtypes: list, mode: str) -> torch.Tensor:
    dtype = r.choice(dtypes)
    # (no complex params under AMP, with sparse gradients or master weights,
    # which refuse them or torch's code does)
    if mode in ("plain", "clip") and r.random() < 0.1:
        dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    kind = r.random()
    shape = () if kind < 0.1 else (0,) if kind < 0.15 else (
        (r.randint(1, 70),) if kind < 0.6 else (r.randint(1, 20), r.randint(1, 20)))
    values = torch.randn(shape, dtype=dtype, generator=gen)
    if len(shape) == 2 and r.random() < 0.3 and mode != "sparse":
        # (column-major; not with sparse gradients, where torch's add raises
        # for some after ours has made the dense part of the step)
        values = torch.randn(shape[::-1], dtype=dtype, generator=gen).t()
    return values


class Lifecycle:
    """torch.optim's optimizer (``ref``) and ours over equal params, changed
    and stepped alike; ``log`` says what was done (the failure message)."""

    def __init__(self, r: random.Random, compiled: bool = False) -> None:
        self.r = r
        # ours stepped through torch.compile: (the optimizer, its compiled
        # step), compiled again for a new optimizer (found by identity, not
        # id(): a scheduler's step wrapper holds its optimizer by a weak
        # reference, so an old one could die and a new one at its id get
        # its compiled step)
        self.compiled, self._compiled_step = compiled, (None, None)
        # (every tensor value from here, drawn from r: a failing example
        # replays exactly, which hypothesis needs to shrink it)
        self.gen = torch.Generator().manual_seed(r.getrandbits(32))
        self.name = r.choice(OPTIMIZER_NAMES)
        mode = r.choice(["plain", "plain", "amp", "clip", "sparse", "master"])
        if (mode == "clip" and self.name == "Lamb") or (
                mode == "sparse" and self.name not in SPARSE_OK) or (
                compiled and mode in ("amp", "sparse")):
            # (Lamb clips by its own rule; sparse: SGD, Adagrad, not under
            # torch.compile; GradScaler calls the step it is given)
            mode = "plain"
        self.mode = mode
        # amp: ours unscales in its step (the flag fused=True sets) or lets
        # GradScaler unscale (the default): Note [who unscales under
        # GradScaler]
        self.amp_in_step = mode == "amp" and r.random() < 0.5
        self.dtypes = r.choice([[torch.float32], [torch.float64], [torch.float32, torch.float64]])
        # master: our params in this dtype, torch.optim's in float32
        self.low = r.choice([torch.bfloat16, torch.float16]) if mode == "master" else None
        if self.low is not None:
            self.dtypes = [torch.float32]
        starts = [random_param(r, self.gen, self.dtypes, mode) for _ in range(r.randint(1, 5))]
        cuts = sorted(r.sample(range(1, len(starts)), r.randint(0, min(2, len(starts) - 1))))
        self.bounds = [0, *cuts, len(starts)]
        self.overrides = [random_options(self.name, r) if r.random() < 0.5 else {}
                          for _ in range(len(self.bounds) - 1)]
        if self.name not in NOT_IN_TORCH and mode != "master":
            for options in self.overrides:
                if r.random() < 0.15:
                    # (a group stepped by torch.optim's own code in ours)
                    key, value = r.choice([("fused", False), ("differentiable", True)])
                    options[key] = value
        self.kwargs = random_options(self.name, r)
        if r.random() < 0.15:
            self.kwargs["lr"] = torch.tensor(self.kwargs.get("lr", 0.01), dtype=torch.float64)
        self.scheduler = r.choice([None, None, *SCHEDULERS])
        self.clip_norm = r.choice([0.1, 1.0, 10.0])
        self.ref_params, self.our_params = self._param_pair(starts)
        in_step = " in step" if self.amp_in_step else ""
        self.log = [f"{self.name} {mode}{in_step} {self.low or ''} {self.kwargs} groups {self.overrides} "
                    f"scheduler {self.scheduler} "
                    f"shapes {[tuple(t.shape) for t in starts]} {[t.dtype for t in starts]}"]
        self.ref, self.ours = self._new_pair()
        self.schedulers = self._new_schedulers()
        if mode == "amp":
            scale = 2.0 ** r.randint(0, 12)
            self.scalers = [torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2)
                            for _ in range(2)]
            for scaler in self.scalers:
                scaler.scale(torch.ones(()))  # (makes its scale)

    def _param_pair(self, starts) -> tuple[list, list]:
        """torch.optim's params and ours, equal (master: ours rounded to
        ``low``, torch's the same values in float32)."""
        if self.low is not None:
            starts = [t.to(self.low) for t in starts]
            return ([torch.nn.Parameter(t.float()) for t in starts],
                    [torch.nn.Parameter(t.clone()) for t in starts])
        return ([torch.nn.Parameter(t.clone()) for t in starts],
                [torch.nn.Parameter(t.clone()) for t in starts])

    def _new_pair(self):
        ours_kwargs = dict(self.kwargs)
        if self.mode == "clip":
            ours_kwargs["max_grad_norm"] = self.clip_norm
        if self.mode == "master":
            ours_kwargs["master_weights"] = True
        ref_kwargs = dict(self.kwargs)
        if self.name not in NOT_IN_TORCH:
            ref_kwargs["foreach"] = False
        ours = getattr(fused_optim, self.name)(self._groups(self.our_params), **ours_kwargs)
        if self.amp_in_step:
            # (what fused=True sets; fused=True itself would make the groups
            # drawn with differentiable=True raise, as torch's do)
            ours._step_supports_amp_scaling = True
        return torch_class(self.name)(self._groups(self.ref_params), **ref_kwargs), ours

    def _new_schedulers(self, saved=None) -> list:
        """One scheduler per optimizer, from ``saved`` (a scheduler's
        state_dict) where given."""
        if self.scheduler is None:
            return []
        schedulers = [SCHEDULERS[self.scheduler](opt) for opt in self.both()]
        if saved is not None:
            for scheduler in schedulers:
                scheduler.load_state_dict(copy.deepcopy(saved))
        return schedulers

    def _groups(self, params) -> list:
        return [{"params": params[lo:hi], **copy.deepcopy(o)}
                for lo, hi, o in zip(self.bounds, self.bounds[1:], self.overrides)]

    def both(self):
        return (self.ref, self.ours)

    # -- what training code does between steps ------------------------------

    def change_something(self) -> None:
        r = self.r
        gi = r.randrange(len(self.ref.param_groups))
        what = r.random()
        if what < 0.25:
            lr = r.choice([1e-3, 0.05, 0.2])
            self.log.append(f"group {gi} lr = {lr}")
            for opt in self.both():
                if isinstance(opt.param_groups[gi]["lr"], torch.Tensor):
                    opt.param_groups[gi]["lr"].fill_(lr)
                else:
                    opt.param_groups[gi]["lr"] = lr
        elif what < 0.4:
            self.log.append(f"group {gi} maximize flipped")
            for opt in self.both():
                opt.param_groups[gi]["maximize"] = not opt.param_groups[gi]["maximize"]
        elif what < 0.55:
            wd = r.choice([0.0, 0.1])
            self.log.append(f"group {gi} weight_decay = {wd}")
            for opt in self.both():
                opt.param_groups[gi]["weight_decay"] = wd
        elif what < 0.65 and ROW[self.name].decoupled_flag:
            flag = ROW[self.name].decoupled_flag
            self.log.append(f"group {gi} {flag} flipped")
            for opt in self.both():
                opt.param_groups[gi][flag] = not opt.param_groups[gi][flag]
        elif what < 0.85 and self.name in MODES_TURNED_ON and self.mode != "amp":
            # (under AMP a skipped step takes back the state ours made for
            # it, which torch's pre-made zeros would not mirror)
            key = r.choice(sorted(MODES_TURNED_ON[self.name]))
            value = MODES_TURNED_ON[self.name][key]
            self.log.append(f"group {gi} {key} = {value}")
            for opt in self.both():
                opt.param_groups[gi][key] = value
        elif not self.schedulers:  # (a scheduler knows the groups it was made for)
            self.add_group()

    def add_group(self) -> None:
        starts = [random_param(self.r, self.gen, self.dtypes, self.mode)
                  for _ in range(self.r.randint(1, 2))]
        options = random_options(self.name, self.r) if self.r.random() < 0.5 else {}
        self.log.append(f"add_param_group {options} {[tuple(t.shape) for t in starts]}")
        ref_new, our_new = self._param_pair(starts)
        self.ref.add_param_group({"params": ref_new, **copy.deepcopy(options)})
        self.ours.add_param_group({"params": our_new, **copy.deepcopy(options)})
        self.ref_params += ref_new
        self.our_params += our_new
        self.bounds.append(len(self.ref_params))
        self.overrides.append(options)

    def round_trip(self) -> None:
        """New optimizers loading a checkpoint: torch's from torch's or
        ours, ours from torch's or ours, through torch.save or not."""
        saved = {"torch": copy.deepcopy(self.ref.state_dict()),
                 "ours": copy.deepcopy(self.ours.state_dict())}
        if self.r.random() < 0.3:
            buffer = io.BytesIO()
            torch.save(saved["ours"], buffer)
            buffer.seek(0)
            saved["ours"] = torch.load(buffer, weights_only=True)
        into_ref, into_ours = self.r.choice(["torch", "ours"]), self.r.choice(["torch", "ours"])
        if self.mode == "master":
            # (torch.optim's checkpoint holds no master copies: ours would
            # make them from its rounded params, torch's from float32 ones)
            into_ref, into_ours = "torch", "ours"
        if self.mode == "sparse":
            # (our packed state loads as views at storage offsets, where
            # torch's sparse add into SGD's buffer writes out of bounds:
            # Note [state arena]. Ours gives such state its own memory.)
            into_ref = "torch"
        self.log.append(f"round trip: torch's from {into_ref}'s, ours from {into_ours}'s")
        scheduler_state = self.schedulers[0].state_dict() if self.schedulers else None
        self.ref, self.ours = self._new_pair()
        ref_state = copy.deepcopy(saved[into_ref])
        if self.name in NOT_IN_TORCH and self.mode == "clip":
            # (the reference classes clip by a group's max_grad_norm, which
            # this harness then applies to torch's gradients itself: twice)
            for group in ref_state["param_groups"]:
                group.pop("max_grad_norm", None)
        self.ref.load_state_dict(ref_state)
        self.ours.load_state_dict(copy.deepcopy(saved[into_ours]))
        self.schedulers = self._new_schedulers(scheduler_state)

    def set_grads(self) -> None:
        r, gen = self.r, self.gen
        if r.random() < 0.1:
            self.log.append("zero_grad(set_to_none=False)")
            for opt in self.both():
                opt.zero_grad(set_to_none=False)
        # (clipping and AMP change torch's gradients in place: none kept)
        keep_ok = self.mode in ("plain", "sparse")
        inf_at = r.randrange(len(self.ref_params)) if self.mode == "amp" and r.random() < 0.25 else -1
        for i, (a, b) in enumerate(zip(self.ref_params, self.our_params)):
            if keep_ok and a.grad is not None and r.random() < 0.05:
                continue
            if r.random() < 0.15:
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, dtype=a.dtype, generator=gen)
            if self.mode == "amp":
                g *= self.scalers[0].get_scale()
                if i == inf_at and g.numel():
                    g.view(-1)[r.randrange(g.numel())] = r.choice([float("inf"), float("nan")])
                    self.log.append(f"inf/NaN in grad {i}")
            if self.low is not None:
                g = g.to(self.low)
                a.grad, b.grad = g.float(), g
                continue
            if self.mode == "sparse" and g.dim() and g.numel() and r.random() < 0.6:
                g = (g * (torch.rand(g.shape, generator=gen) < 0.5)).to_sparse(
                    r.randint(1, g.dim()))
                self.log.append(f"sparse grad {i}")
            a.grad, b.grad = g.clone(), g.clone()

    def step(self) -> bool:
        """Steps both; returns False where torch.optim raised (a sparse
        gradient with weight decay, a dense one into a sparse momentum
        buffer), having checked that ours raised too and changed nothing."""
        if self.mode == "amp" and all(p.grad is None for p in self.ref_params):
            return True  # (GradScaler refuses a step without gradients)
        self._premake_missing_mode_state()
        if self.mode == "clip" and "max_grad_norm" in self.ours.param_groups[0]:
            self._clip_ref_grads()
        if self.mode == "amp":
            # (sometimes unscaled first, as code that clips does: the step
            # then gets no scale from GradScaler, only its inf flag)
            unscale, clip = self.r.random() < 0.3, self.r.random() < 0.5
            if unscale:
                self.log.append("unscale_" + (", clip_grad_norm_" if clip else ""))
            for scaler, opt, params in zip(self.scalers, self.both(),
                                           (self.ref_params, self.our_params)):
                if unscale:
                    scaler.unscale_(opt)
                    if clip:
                        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
                scaler.step(opt)
                scaler.update()
            assert self.scalers[0].get_scale() == self.scalers[1].get_scale()
            for scheduler in self.schedulers:
                scheduler.step()
            return True
        try:
            self.ref.step()
        except RuntimeError as refused:  # (the schedulers are not stepped: the run ends)
            self.log.append(f"torch.optim raised {refused}")
            snapshot = snapshot_optimizer(self.ours)
            with pytest.raises(RuntimeError):
                self.ours.step()
            assert_optimizer_unchanged(self.ours, snapshot, "\n".join(self.log))
            return False
        self._step_ours()
        for scheduler in self.schedulers:
            scheduler.step()
        return True

    def _step_ours(self) -> None:
        if not self.compiled:
            self.ours.step()
            return
        if self._compiled_step[0] is not self.ours:
            self._compiled_step = (self.ours, torch.compile(self.ours.step, backend="eager"))
        self._compiled_step[1]()

    def _premake_missing_mode_state(self) -> None:
        if self.name not in MODE_STATE_MADE_AS_ZEROS:
            return
        for group in self.ref.param_groups:
            for key in MODES_TURNED_ON[self.name]:
                if not group.get(key):
                    continue
                for p in group["params"]:
                    state = self.ref.state.get(p)
                    if state and p.grad is not None and STATE_OF_MODE[key] not in state:
                        state[STATE_OF_MODE[key]] = torch.zeros_like(p)

    def _clip_ref_grads(self) -> None:
        """torch.nn.utils.clip_grad_norm_ as ours documents it: the sum of
        squares accumulated in float64, the norm in float32 (float64 if a
        gradient is), torch's factor ``max_norm / (norm + 1e-6)`` in each
        gradient's dtype. (torch's own rounds a norm per tensor first.)"""
        grads = [p.grad for p in self.ref_params if p.grad is not None]
        if not grads:
            return
        real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        wide = any(g.dtype == torch.float64 for g in real)
        sum_of_squares = torch.stack([g.double().square().sum() for g in real]).sum()
        norm = sum_of_squares.to(torch.float64 if wide else torch.float32).sqrt()
        for g in real:
            factor = norm.to(g.dtype).add(1e-6).reciprocal() * self.clip_norm
            g.mul_(factor.clamp(max=1.0))

    def check(self, where: str) -> None:
        if self.low is None:  # (else ours has master copies where torch has nothing)
            has_state = [[p in opt.state for p in params] for opt, params in
                         ((self.ref, self.ref_params), (self.ours, self.our_params))]
            assert has_state[1] == has_state[0], f"{where}: params with state (torch's first)"
        for i, (a, b) in enumerate(zip(self.ref_params, self.our_params)):
            state = dict(self.ours.state.get(b, {}))
            if self.low is not None:
                master = state.pop("master_param", a.detach())  # (none before a gradient)
                assert_close(master, a.detach(), msg=lambda m: f"{where} master of param {i}: {m}")
                a = a.detach().to(self.low)
            assert_close(b.detach(), a.detach(), msg=lambda m: f"{where} param {i}: {m}")
            assert_same_state(state, self.ref.state.get(self.ref_params[i], {}),
                              f"{where} param {i}")
        for gi, (ga, gb) in enumerate(zip(*(o.param_groups for o in self.both()))):
            assert set(gb) - OUR_GROUP_KEYS == set(ga) - OUR_GROUP_KEYS, f"{where} group {gi}"


def run_lifecycle(life: Lifecycle, r: random.Random) -> None:
    for step in range(r.randint(3, 10)):
        action = r.random()
        if action < 0.1:
            life.round_trip()
        elif action < 0.35:
            life.change_something()
        life.set_grads()
        life.log.append(f"step {step}")
        if not life.step():
            return
        life.check("\n".join(life.log))


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_lifecycle_matches_torch(r):
    run_lifecycle(Lifecycle(r), r)


# Each compiles (Dynamo's "eager" backend: the traced step, without
# inductor's code generation), so few run in CI.
COMPILED_EXAMPLES = int(os.environ.get("FUSED_OPTIM_COMPILED_LIFECYCLES", "12"))


@settings(SETTINGS, max_examples=COMPILED_EXAMPLES)
@given(st.randoms(use_true_random=False))
def test_compiled_lifecycle_matches_torch(r):
    """The same with our step under torch.compile (found a step that wrote
    the wrong params: test_torch_compat.
    test_compiled_step_with_complex_groups_between_others)."""
    torch._dynamo.reset()
    run_lifecycle(Lifecycle(r, compiled=True), r)
