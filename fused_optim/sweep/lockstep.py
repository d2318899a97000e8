"""K configurations of one model trained in lockstep: one batched forward
and backward for all of them, one fused optimizer call per optimizer type.

How (model ensembling with ``torch.func``, plus per-configuration
hyperparameters, which torch.optim cannot give one stacked tensor):

- Every param and buffer of the model is stacked along a new leading
  dimension K (``stack_module_state``). The stacked params are the autograd
  leaves; their gradients live in persistent stacked buffers, zeroed and
  accumulated into each step (measured faster than handing autograd's
  gradients to the views each step: those come in the transposed layout of
  the batched matmuls and would be copied anyway). A param the loss does
  not reach in a step gets no gradient in its views (as with
  ``zero_grad(set_to_none=True)`` in a plain loop).
- ``vmap`` over ``functional_call`` runs the K models in one forward pass
  (``randomness="different"``: each configuration draws its own dropout
  masks; buffers such as BatchNorm statistics are per configuration, updated
  in place in their slice). The K losses are summed and one ``backward``
  gives each configuration exactly its own gradient: no op mixes slices.
- Configuration k is param group k of a fused optimizer, and its params are
  views ``stacked[k]`` with gradients ``stacked.grad[k]``: one op call
  updates every tensor of every configuration that uses that optimizer, each
  with its own group's hyperparameters (one call per kernel mode: SGD with
  and without momentum, and with Nesterov momentum, are three calls, kept
  between steps like any step's calls). No copies, no new kernel. AdamW
  configurations are groups of the Adam optimizer with
  ``decoupled_weight_decay=True`` (and AdamW's default weight decay): the
  op takes the decay mode per group, so Adam and AdamW share its calls.
- Dropping configurations (divergence, successive halving) keeps the rows of
  the others (``index_select``) and moves their optimizer state over
  unchanged, so the remaining steps cost less and the kept configurations
  continue bit for bit as if nothing had been dropped (each slice's
  arithmetic does not depend on K; tested). Not with dropout: one draw
  makes the masks of all K slices, so after a drop the others draw
  different (equally distributed) masks.

Not supported: tied weights (one param under two names; ``stack_module_state``
stacks it once), and models whose forward depends on the batch of configs.

A run that starts with one configuration skips vmap and calls a copy of the
module whose params are the slices (as cheap as a plain training loop); it
has nothing to drop, so no run switches paths midway. A ``nn.Sequential``
MLP skips vmap too (stacked.py).
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import fused_optim
from fused_optim import _C

from fused_optim.sweep import stacked
from fused_optim.sweep.space import Config, make_configs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _GroupView(torch.optim.Optimizer):
    """One configuration's param group seen as an optimizer, so that any
    ``torch.optim.lr_scheduler`` can drive it (schedulers take an
    Optimizer and change ``lr`` in its groups: here, in the real group)."""

    def __init__(self, group: dict) -> None:  # noqa: D107 (no Optimizer.__init__: no copies)
        self.param_groups = [group]
        self.defaults = {}
        self.state = {}
        self._opt_called = True  # (stepped by the lockstep optimizer, not here)


def warmup_cosine(warmup_steps: int, total_steps: int, cosine: bool) -> Callable[[int], float]:
    """The factor of the base lr at scheduler step t: linear from 1/warmup
    to 1 over ``warmup_steps``, then 1 (constant) or a cosine decay to 0 at
    ``total_steps``."""

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if not cosine:
            return 1.0
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup_steps) / span)))

    return factor


class _Scaled:
    """``LambdaLR(group, factor)`` for one group, at the cost of one
    multiplication per step: lr = base lr * factor(t), t = 0 at the start
    and +1 per ``step()`` (LambdaLR's arithmetic; a LambdaLR per
    configuration costs about 20 us of Python a step each)."""

    def __init__(self, group: dict, factor: Callable[[int], float]) -> None:
        self.group, self.factor, self.base, self.t = group, factor, group["lr"], 0
        group["lr"] = self.base * factor(0)

    def step(self) -> None:
        self.t += 1
        self.group["lr"] = self.base * self.factor(self.t)


def _optimizer_of(config: Config) -> tuple[type, dict]:
    """The fused optimizer class that steps ``config``'s group, and the
    group options that make it behave as the configuration's own class:
    AdamW is Adam with decoupled decay and AdamW's default weight decay."""
    if config.optimizer_class is fused_optim.AdamW:
        weight_decay = inspect.signature(fused_optim.AdamW).parameters["weight_decay"].default
        return fused_optim.Adam, {"weight_decay": weight_decay, "decoupled_weight_decay": True}
    return config.optimizer_class, {}


def _clip_limit(config: Config) -> float:
    """The global norm configuration ``config`` clips its gradients to: its
    ``clip_grad_norm`` run key or its optimizer's ``max_grad_norm`` (the
    same clipping: its own gradients' norm; the class's default when the
    configuration does not set it: Lamb clips at 1.0, as timm's), or inf."""
    default = inspect.signature(config.optimizer_class).parameters["max_grad_norm"].default
    limit = config.run.get("clip_grad_norm", config.kwargs.get("max_grad_norm", default))
    return math.inf if limit is None else float(limit)


def _schedule(config: Config, group: dict, total_steps: int):
    schedule = config.run.get("schedule", "constant")
    if callable(schedule):
        return schedule(_GroupView(group))
    warmup = config.run.get("warmup_steps", 0)
    if schedule == "constant" and not warmup:
        return None
    return _Scaled(group, warmup_cosine(warmup, total_steps, schedule == "cosine"))


def _initial_modules(model, configs: list[Config]) -> list[nn.Module]:
    """Each configuration's starting module: the shared one (``model``, or
    one ``model()``), or one drawn with its ``init_seed``: a factory is
    called under the seed; a module is copied and every submodule's
    ``reset_parameters`` called under it."""
    shared = None
    modules = []
    for config in configs:
        seed = config.run.get("init_seed")
        if seed is None:
            if shared is None:
                shared = model if isinstance(model, nn.Module) else model()
            modules.append(shared)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if not isinstance(model, nn.Module):
                modules.append(model())
                continue
            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            modules.append(fresh)
    return modules


class Lockstep:
    """Trains configurations ``configs`` (dicts, see ``space``) of ``model``
    in lockstep.

    Args:
        model: an ``nn.Module`` (every configuration starts from its current
            weights, or from ``init_seed``) or a factory returning one (called
            once under torch's current RNG, or once per ``init_seed``).
        configs: the configurations, dicts or ``Config``.
        loss_fn: ``loss_fn(output, target) -> scalar`` for one configuration
            (e.g. ``torch.nn.functional.cross_entropy``).
        total_steps: the run's length, for cosine schedules.
        device: where to train (default: the model's).
    """

    def __init__(self, model, configs, loss_fn: LossFn, *, total_steps: int = 1,
                 device: torch.device | str | None = None) -> None:
        self.configs: list[Config] = make_configs(configs)
        self.loss_fn = loss_fn
        self.total_steps = total_steps
        modules = _initial_modules(model, self.configs)
        first = modules[0]
        if device is None:
            device = next(iter(first.parameters())).device
        self.device = torch.device(device)
        self.state_dict_keys = list(first.state_dict().keys())
        params, buffers = stack_module_state(modules)  # (copies: the model is not touched)
        self.params = {n: t.detach().to(self.device).requires_grad_() for n, t in params.items()}
        self.buffers = {n: t.detach().to(self.device) for n, t in buffers.items()}
        for t in self.params.values():
            t.grad = torch.zeros_like(t)
        self._reached: set = set()  # the params the last backward reached
        self._views_without_grads = False
        self._watch_gradients()
        self.template = copy.deepcopy(first).to("meta")
        self.batched = len(self.configs) > 1
        # the fast path for Sequential MLPs, and F.cross_entropy without vmap (stacked.py)
        self._layers = stacked.plan(self.template)
        self._batched_loss = stacked.batched_loss(loss_fn)
        if not self.batched:
            self._single = self._single_module(first)
        self.steps_done = 0
        self._build_optimizers(previous=None)

    def _single_module(self, module: nn.Module) -> nn.Module:
        """One configuration: a copy of the module whose params and buffers
        are the (only) slices of the stacked ones, called directly, its
        params handed to the optimizer: as cheap as a plain training loop
        (autograd hands each gradient over without a copy)."""
        single = copy.deepcopy(module)
        for name, stacked_param in self.params.items():
            owner, _, leaf = name.rpartition(".")
            setattr(single.get_submodule(owner), leaf, nn.Parameter(stacked_param.detach()[0]))
        for name, stacked_buffer in self.buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(single.get_submodule(owner), leaf, stacked_buffer[0])
        return single

    # ----- the configurations' param groups ----------------------------------------------

    def _build_optimizers(self, previous) -> None:
        """One fused optimizer per optimizer type; configuration k is param
        group k's views. ``previous`` (old views, old optimizers) moves the
        kept configurations' state over to the new views."""
        if not self.batched:  # the module's own params (views too): a plain training loop
            per_slot = [[self._single.get_parameter(n) for n in self.params]]
        else:
            per_slot = [
                [t.detach()[k] for t in self.params.values()] for k in range(len(self.configs))
            ]
            _C.set_slice_grads(per_slot, [t.grad for t in self.params.values()])
        groups_of: dict[type, list] = {}
        self.groups: list[dict] = []
        for k, config in enumerate(self.configs):
            cls, options = _optimizer_of(config)
            if previous is not None:
                group = previous["groups"][k]
                group["params"] = per_slot[k]
            else:
                group = {"params": per_slot[k], **options, **config.kwargs}
                # One optimizer steps many configurations: its max_grad_norm
                # would clip by the norm of all of them. Each configuration
                # is clipped by its own norm instead (clip_gradients).
                group["max_grad_norm"] = None
            groups_of.setdefault(cls, []).append(group)
            self.groups.append(group)
        optimizers = {cls: cls(groups) for cls, groups in groups_of.items()}
        if previous is not None:
            for k, config in enumerate(self.configs):
                cls, _ = _optimizer_of(config)
                old_state = previous["optimizers"][cls].state
                new_state = optimizers[cls].state
                for old, new in zip(previous["views"][k], per_slot[k]):
                    if old in old_state:
                        new_state[new] = old_state[old]
            self.schedulers = previous["schedulers"]
        else:
            self.schedulers = [_schedule(c, g, self.total_steps) for c, g in zip(self.configs, self.groups)]
        self.optimizers = optimizers
        self.views = per_slot
        self._clip = None
        limits = [_clip_limit(c) for c in self.configs]
        if any(limit != math.inf for limit in limits):
            self._clip = torch.tensor(limits, dtype=torch.float32, device=self.device)

    def _watch_gradients(self) -> None:
        """Notes, per backward, which stacked params get a gradient."""
        for name, t in self.params.items():
            t.register_post_accumulate_grad_hook(lambda _, name=name: self._reached.add(name))

    def optimizer_of(self, k: int):
        """The fused optimizer that steps configuration k (its param group
        is ``self.groups[k]``)."""
        return self.optimizers[_optimizer_of(self.configs[k])[0]]

    def keep(self, slots: list[int]) -> None:
        """Keeps only the configurations in ``slots`` (positions in
        ``self.configs``), dropping the rest: their rows leave the stacked
        params, gradients and buffers, their state leaves the optimizers."""
        slots = sorted(set(slots))
        if slots == list(range(len(self.configs))):
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        previous = {
            "views": [self.views[k] for k in slots],
            "groups": [self.groups[k] for k in slots],
            "optimizers": self.optimizers,
            "schedulers": [self.schedulers[k] for k in slots],
        }
        with torch.no_grad():
            # (the gradients too: a configuration may be dropped between
            # backward and update, when it diverged)
            grads = {n: t.grad.index_select(0, index) for n, t in self.params.items()}
            self.params = {n: t.detach().index_select(0, index).requires_grad_()
                           for n, t in self.params.items()}
            self.buffers = {n: t.index_select(0, index) for n, t in self.buffers.items()}
        for name, t in self.params.items():
            t.grad = grads[name]
        self._watch_gradients()
        self.configs = [self.configs[k] for k in slots]
        self._build_optimizers(previous)
        self._views_without_grads = bool(self._reached) and len(self._reached) < len(self.params)
        if self._views_without_grads:  # (dropped between a backward and its update)
            _C.set_slice_grads(self.views, [
                t.grad if name in self._reached else None for name, t in self.params.items()])

    # ----- one step ------------------------------------------------------------------------

    def _output(self, params: dict, buffers: dict, x):
        return functional_call(self.template, (params, buffers), (x,))

    def forward(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (K,), outputs (K, ...)) of every configuration on one batch."""
        if not self.batched:
            out = self._single(x)
            return self.loss_fn(out, y).unsqueeze(0), out.unsqueeze(0)
        if self._layers is not None:
            out = stacked.forward(self._layers, self.params, x, len(self.configs))
        else:
            out = vmap(self._output, in_dims=(0, 0, None), randomness="different")(
                self.params, self.buffers, x)
        if self._batched_loss is not None:
            return self._batched_loss(out, y), out
        return vmap(self.loss_fn, in_dims=(0, None))(out, y), out

    def _train_mode(self, mode: bool) -> None:
        if self.template.training == mode:  # (Module.train walks every submodule)
            return
        self.template.train(mode)
        if not self.batched:
            self._single.train(mode)

    def backward(self, x, y) -> torch.Tensor:
        """Forward and backward on one batch; returns the K losses
        (detached). Gradients land in each configuration's ``.grad`` views."""
        self._train_mode(True)
        if not self.batched:
            for param in self.views[0]:
                param.grad = None
            loss = self.loss_fn(self._single(x), y)
            loss.backward()
            return loss.detach().unsqueeze(0)
        torch._foreach_zero_([t.grad for t in self.params.values()])
        self._reached.clear()
        losses, _ = self.forward(x, y)
        losses.sum().backward()
        if len(self._reached) < len(self.params) or self._views_without_grads:
            # Params the loss did not reach this step: their views get no
            # gradient, so the optimizers skip them, as a plain loop's do.
            _C.set_slice_grads(self.views, [
                t.grad if name in self._reached else None for name, t in self.params.items()])
            self._views_without_grads = len(self._reached) < len(self.params)
        return losses.detach()

    def _stacked_grads(self) -> list:
        """Each param's gradients of all configurations, (K, ...)."""
        if self.batched:
            return [t.grad for t in self.params.values()]
        return [p.grad.unsqueeze(0) for p in self.views[0] if p.grad is not None]

    def clip_gradients(self) -> None:
        """Per configuration, scales its gradients to at most its
        ``clip_grad_norm`` global L2 norm, as ``clip_grad_norm_`` does
        (coefficient max_norm / (norm + 1e-6), capped at 1)."""
        if self._clip is None:
            return
        grads = self._stacked_grads()
        if not grads:
            return
        squares = torch.stack([g.flatten(1).float().square().sum(1) for g in grads]).sum(0)
        coefficient = (self._clip / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coefficient.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    def update(self) -> None:
        """Clips, then one fused optimizer step per optimizer type, then each
        configuration's LR schedule."""
        self.clip_gradients()
        for optimizer in self.optimizers.values():
            optimizer.step()
        for scheduler in self.schedulers:
            if scheduler is not None:
                scheduler.step()
        self.steps_done += 1

    @torch.no_grad()
    def evaluate(self, x, y, metric=None, batch_size: int = 1024) -> tuple[list, list | None]:
        """Per configuration: the mean loss on (x, y) in eval mode, and the
        mean of ``metric(output, target) -> scalar`` (written for one
        configuration, run under vmap; None without a metric)."""
        self._train_mode(False)
        k = len(self.configs)
        loss_sum = torch.zeros(k, dtype=torch.float64)
        metric_sum = torch.zeros(k, dtype=torch.float64)
        try:
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                losses, outputs = self.forward(xb, yb)
                loss_sum += losses.double().cpu() * len(xb)
                if metric is not None:
                    values = vmap(metric, in_dims=(0, None))(outputs, yb)
                    metric_sum += values.double().cpu() * len(xb)
        finally:
            self._train_mode(True)
        means = (loss_sum / len(x)).tolist()
        return means, (metric_sum / len(x)).tolist() if metric is not None else None

    def state_dict(self, slot: int) -> dict:
        """Configuration ``slot``'s weights as a plain ``state_dict`` of the
        original module (same keys, cloned tensors)."""
        tensors = {**self.params, **self.buffers}
        return {name: tensors[name][slot].detach().clone() for name in self.state_dict_keys}
