"""What every fused optimizer shares, and what each one says of itself.

A subclass (see adam.py) says which state it keeps, how to create it, which
group options select a kernel (``_mode``), which hyperparameters it reads per
group, and the mode flags of its op. The bookkeeping is shared, one job per
file:

- the step protocol (_step.py): plan, validate every call before anything
  is written (Note [validate before mutating]), then one op call per bucket;
  the op increments the step counters itself;
- planning (_planning.py): bucket the params of all groups by (device,
  dtype, mode, precision), creating state lazily for params that got their
  first gradient (_bucket.py says what a plan caches);
- checkpoints (_checkpoint.py): torch.optim's layout, loaded without loss;
- the precision policy (_precision.py), the implementation keywords
  (_keywords.py), torch.optim's own step for fused=False (_torch_path.py),
  the traced step under torch.compile (_traced.py).
"""

from __future__ import annotations

import operator
import os
import sys
import warnings

import torch
from torch.optim import Optimizer

from fused_optim import _C, _arena, _ops, _reference, _torch_path
from fused_optim._build import has_kernels, unsupported_device_warning
from fused_optim._bucket import Plan, Precision
from fused_optim._checkpoint import Checkpoints
from fused_optim._keywords import check_group_options, chosen_fused_only_options, to_float
from fused_optim._planning import Planning, new_step
from fused_optim._precision import PRECISION_DEFAULTS
from fused_optim._state import OptimizerState
from fused_optim._step import StepProtocol
from fused_optim._traced import TracedStep


# Per class: the reader of a group's raw key (FusedOptimizer._raw_group_key).
_RAW_KEY_GETTERS: dict = {}
_PACKAGE_DIRS = tuple(os.path.dirname(path) + os.sep for path in (torch.__file__, __file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that names the line of
    the caller's code: the first frame outside fused_optim and torch
    (whose hooks and decorators wrap step())."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    return level


# Note [who unscales under GradScaler]
# torch.optim's rule: an optimizer built with fused=True unscales in its step
# (GradScaler hands it grad_scale and found_inf and calls step() even on a
# skipped step); any other lets GradScaler unscale the gradients in a pass
# of its own and is not called on a skipped step. Ours follows it, so code
# that reads the flag sees what it would see with torch.optim: Lightning
# refuses gradient clipping under mixed precision for an optimizer that
# unscales in its step, and accelerate infers a skipped step from step()
# not being called. With master_weights (given to the constructor, or to
# any param group) the params are often float16, whose gradients
# GradScaler refuses to unscale itself ("Attempting to unscale FP16
# gradients"), so those unscale in the step too. Either way our fused step
# runs; only who divides by the scale differs (in the step it costs no
# extra pass over memory: fused=True to ask for it). The flag is read from
# the groups each time (a property), so a group added or loaded later with
# master_weights counts, as does a pickled or deep-copied optimizer.
def amp_scaling_in_step(defaults, param_groups=(), cautious: bool = False) -> bool:
    """Whether GradScaler should hand its scale to step() (the Note above);
    ``cautious`` as for _torch_path.path_keys."""
    if _torch_path.uses_torch_path(defaults, cautious):
        return False
    if defaults.get("fused") is True or bool(defaults.get("master_weights")):
        return True
    return any(group.get("master_weights") and not _torch_path.uses_torch_path(group, cautious)
               for group in param_groups)


class FusedOptimizer(StepProtocol, Planning, Checkpoints, TracedStep, Optimizer):
    """Base class of the fused optimizers. Not for direct use."""

    # Whether the optimizer keeps a per-param ``step`` counter (SGD does not).
    _has_step = True
    # Per-param 0-d scalar state besides ``step`` that the op reads and
    # updates (NAdam's ``mu_product``), by state key; the op's list is the
    # key plus "s" (Note [per-tensor scalar state] in hyperparams.h). Kept
    # like the step counter: float32 (float64 under a float64 default
    # dtype), where the op reads it, never cast to the state dtype.
    _scalar_state_names: tuple = ()
    # The state keys that _conform_state never casts to the state dtype:
    # the counters and the float32 master copy (set per class below).
    _state_kept_as_is: frozenset = frozenset(("step", "master_param"))

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._state_kept_as_is = frozenset(("step", "master_param", *cls._scalar_state_names))

    # Whether sparse gradients are supported (through torch's functional API).
    _supports_sparse = False
    # Where they are not, the start of the error (torch.optim's message,
    # timm's for Lamb; where is appended); None: "<class> does not support
    # sparse gradients", torch's wording for most classes.
    _sparse_gradient_error: str | None = None

    # The op (fused_optim._ops.OP_NAMES) and the torch.optim class whose
    # step runs groups with fused=False or differentiable=True.
    _op_name: str
    _torch_class: type

    # Note [our options in param groups]
    # Our options that torch.optim's class lacks (the precision options;
    # max_grad_norm, except for timm's Lamb, which has it) are in the param
    # groups only when set to something other than these values, so an
    # optimizer built with torch.optim's arguments has exactly torch.optim's
    # group keys, live and saved: torch's tools that match saved groups
    # against live ones (torch.optim._stateless) take it. Everything reads
    # them with group.get(key, unset).
    # - The precision options are configuration, like the implementation
    #   keywords: load_state_dict keeps the loader's own (Note
    #   [implementation keywords on load]). state_dict() saves them where
    #   they are set, as torch.optim saves every key of its groups: torch's
    #   flattened checkpoints (torch.distributed.checkpoint.state_dict with
    #   flatten_optimizer_state_dict=True, as torchtitan and OLMo-core save
    #   the optimizer) are loaded by reading each key of the loader's live
    #   groups from the checkpoint, a KeyError where one is missing. The
    #   price: DCP's default planner, which wants every key of the loader's
    #   state_dict in the checkpoint, loads a torch.optim checkpoint into an
    #   optimizer with them set only with allow_partial_load=True (as it
    #   does a checkpoint without our master_param or rounding step; the
    #   template's own keys then stay, which the flattened loader reads). A
    #   saved state_dtype is its name, "torch.bfloat16": torch's gathering
    #   and offloading (full_state_dict, cpu_offload) take no dtype object,
    #   and a name that wrappers copy into a live group (ZeRO's load,
    #   torch.optim._stateless's swap-in) is read as the dtype.
    # - max_grad_norm is an option of training, like a hyperparameter:
    #   saved when set, loaded as torch loads hyperparameters (a group
    #   keeps its own when the checkpoint has none).
    _unset_options: dict = {**PRECISION_DEFAULTS, "max_grad_norm": None}

    def __init__(self, params, defaults):
        self._plan: Plan | None = None
        # [the norm the last clipped step measured]: a list, whose item a
        # traced step can set (Dynamo drops attribute writes on an Optimizer)
        self._grad_norm_cell: list = [None]
        defaults = {k: v for k, v in defaults.items() if not self._is_unset_option(k, v)}
        super().__init__(params, defaults)
        self.state = OptimizerState(self.state)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether torch.amp.GradScaler hands ``grad_scale`` and ``found_inf``
        to step() (as attributes) instead of unscaling the gradients itself:
        the kernels then unscale in registers and skip the step on inf/NaN
        without a host sync (Note [who unscales under GradScaler]). Code
        that sets it (as on torch's optimizers, a plain attribute) is
        obeyed until the optimizer is pickled or copied."""
        chosen = self.__dict__.get("_amp_scaling_chosen")
        if chosen is not None:
            return chosen
        return amp_scaling_in_step(self.defaults, self.param_groups, self._takes_caution)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value) -> None:
        self._amp_scaling_chosen = bool(value)

    def _mode(self, group) -> tuple:
        """Group options that select a different kernel (one call per mode;
        none by default)."""
        return ()

    def _op_modes(self, mode: tuple) -> dict:
        """The op's mode flags (its keyword-only arguments) for ``mode``."""
        return {}

    def _state_names(self, mode: tuple) -> tuple:
        """Dense state tensors the op takes, in op order, for this mode."""
        raise NotImplementedError

    # State that torch.optim's code makes itself where a param lacks it (its
    # SGD's momentum buffer, from the gradient); the rest it reads and
    # raises KeyError for (_torch_path.make_missing_mode_state).
    _made_by_torch_when_missing: tuple = ()

    # What torch.optim's code raises for a group with fused=True and
    # differentiable=True (its functional refuses the pair, after earlier
    # groups were updated); raised here before anything is written. None:
    # torch's code takes the pair (SGD).
    _fused_differentiable_error: str | None = None

    def _init_state(self, param, group, state: dict, dtype: torch.dtype, names: tuple,
                    new_tensors: list | None = None) -> bool:
        """Fills in a param's missing state: its scalar state
        (``_init_scalar_state``), and a tensor like ``param`` of ``dtype``
        (the state dtype) filled with ``_initial_state_value`` for each
        missing name of ``names`` (the group's mode's ``_state_names``).
        With ``new_tensors``, those tensors are not made here but requested
        from the state arena, which makes a plan's new state tensors
        together (``_arena.NewTensor``, Note [state arena]). Returns True if
        the op must treat the state as new (``_op_writes_new_state``)."""
        self._init_scalar_state(param, group, state)
        missing = [name for name in names if state.get(name) is None]
        if missing:
            request = _arena.NewTensor(param, dtype, self._initial_state_value(group, param))
            if new_tensors is None:
                state.update((name, request.make()) for name in missing)
            else:
                new_tensors.append((state, missing, request))
        return self._op_writes_new_state and bool(missing)

    def _init_scalar_state(self, param, group, state: dict) -> None:
        """Fills in a param's missing scalar state: the step counter where
        the group keeps one (torch.optim's 0-d tensor; NAdam and Adagrad
        override)."""
        if self._keeps_step(group):
            state.setdefault("step", new_step(param.device))

    def _initial_state_value(self, group, param):
        """The value a new state tensor of a param of ``group`` starts at:
        zero (torch.optim's for every dense state but Adagrad's sum)."""
        return 0

    # Whether the op writes a param's new state rather than reading it (the
    # call lists such params as new): SGD's and Lars's momentum buffer
    # (_momentum.py).
    _op_writes_new_state: bool = False

    def _keeps_step(self, group) -> bool:
        """Whether params of this group have a ``step`` counter."""
        return self._has_step

    def _needs_state_for(self, group, state: dict, precision: Precision, names: tuple) -> bool:
        """Whether a param that has a gradient needs (more) state created:
        some state this group's mode uses (``names``: its ``_state_names``)
        is missing, or its master copy (SGD without momentum has no other
        state). A state tensor saved as None counts as missing, as
        torch.optim counts it: torch 1.x's SGD saved ``momentum_buffer:
        None`` for momentum=0, and a run resumed from such a checkpoint with
        momentum makes the buffer then."""
        return (
            any(state.get(name) is None for name in names)
            or (self._keeps_step(group) and "step" not in state)
            or any(name not in state for name in self._scalar_state_names)
            or (precision.master_weights and "master_param" not in state)
        )

    # The group options ``_mode`` reads. With the implementation and
    # precision options they make a group's raw key (``_raw_group_key``),
    # compared each step at C speed before the derived ``_group_key``.
    _mode_keys: tuple = ()
    # Whether the class takes timm's caution=True (Lion, Lamb), whose groups
    # are stepped unfused (Note [cautious groups] in _reference.py).
    _takes_caution: bool = False

    # Note [a param listed twice]
    # torch.optim takes a param group that lists a param more than once
    # (it warns that this will become an error) and updates that param once
    # per listing, one after the other; torch's own tests of
    # _apply_optimizer_in_backward with tied weights compare against that.
    # The fused op cannot (two updates of one tensor in one call would
    # race), so such a group of a class with a torch.optim twin is stepped
    # by torch.optim's code, as under fused=False: torch's result, bit for
    # bit. The groups are found when a plan is built (a group's param list
    # changing re-plans), and in a traced step as it is traced (_traced.py;
    # Dynamo guards on the lists). Refused: such a group of Lion, Lars or
    # Lamb (by the op, as params that overlap in memory), and one with an
    # option only the fused step has (precision options, max_grad_norm:
    # _check_param_listed_twice), before any state is made. Under
    # GradScaler the param's gradient is unscaled once
    # (_torch_path.torch_step), where torch's GradScaler and fused step
    # divide it once per listing.
    _groups_listing_a_param_twice: tuple = ()

    def _unfused(self, group, *, traced: bool = False) -> bool:
        """Whether ``group`` is stepped by the unfused implementation
        (_torch_path.py) rather than the fused op. An eager step reads the
        groups listing a param twice that its plan found; a traced step
        makes no plan and reads the param list (Dynamo guards on it)."""
        if _torch_path.uses_torch_path(group, self._takes_caution):
            return True
        if self._on_a_device_without_kernels(group, traced=traced):
            return True
        if traced:
            return self._lists_a_param_twice(group)
        return any(group is g for g in self._groups_listing_a_param_twice)

    # Note [params on a device without kernels]
    # torch.optim with fused=None steps params on any device (its foreach or
    # for-loop code); our fused step has kernels for CPU and, in a CUDA
    # build, CUDA. A group with a param elsewhere (meta, where a model's
    # shapes are planned and DCP's _init_optim_state steps it; mps; xpu; CUDA
    # in a CPU-only build) is therefore stepped by torch.optim's code, as
    # under fused=False: torch's result, on our state layout, with a
    # warning once per optimizer and device type that says so (none for
    # meta, where no numbers are computed). Not where the fused step is
    # asked for, which raises torch's error for a fused step there (before
    # anything is written): fused=True (torch's fused step refuses such
    # params too), our precision options or max_grad_norm (only the kernels
    # have them), a class torch.optim lacks (Lion, Lars, Lamb: no torch code
    # to run). Decided per group from its params' devices whenever asked
    # (one C++ pass over the list when all are on one device); a cached plan
    # sees a param moved onto such a device when its call is refused (Note
    # [stale plans]), and one moved off it at the next re-plan.
    def _on_a_device_without_kernels(self, group, *, traced: bool = False) -> bool:
        params = group["params"]
        if not params or (not traced and _C.on_one_device(params)
                          and has_kernels(params[0].device)):
            return False  # (the usual case)
        missing = sorted({p.device.type for p in params if not has_kernels(p.device)})
        if not missing or (
            group.get("fused") or chosen_fused_only_options(group)
            or issubclass(self._torch_class, _reference.PerTensorReference)
        ):
            return False
        if not traced:  # (a traced step: warned by the eager steps, if any)
            warned = self.__dict__.setdefault("_warned_device_types", set())
            for device_type in missing:
                if device_type not in warned and device_type != "meta":
                    warned.add(device_type)
                    warnings.warn(
                        unsupported_device_warning(type(self).__name__, device_type,
                                                   "fused" in self.defaults),
                        stacklevel=_user_stacklevel())
        return True

    def _find_groups_listing_a_param_twice(self) -> None:
        """Note [a param listed twice]."""
        self._groups_listing_a_param_twice = tuple(
            group for group in self.param_groups if self._lists_a_param_twice(group))

    def _lists_a_param_twice(self, group) -> bool:
        """Whether torch.optim's code steps ``group`` because it lists a
        param more than once (Note [a param listed twice])."""
        if issubclass(self._torch_class, _reference.PerTensorReference):
            return False  # (an optimizer torch.optim lacks: the op refuses such a group)
        return len({id(p) for p in group["params"]}) != len(group["params"])

    # Whether each of the op's float hyperparameters (its schema's float[]
    # lists other than lr) is the group option of the same name, as is
    # (SGD, Adagrad, RMSprop, Lars): then the schema alone names them. A
    # class whose options are not (Adam's betas are the op's beta1 and
    # beta2) defines ``_hyperparameters``, and may override
    # ``_hyperparameter_lists`` for speed.
    _hyperparameters_are_group_options: bool = False
    # The group option of each of the op's per-group bool lists whose name
    # differs from the list's (Lamb: timm's ``decoupled_decay`` is the op's
    # ``decoupled_weight_decay``).
    _group_flag_keys: dict = {}

    def _raw_group_key(self, group) -> tuple:
        """The raw options of a group that ``_group_key`` derives from, read
        at C speed (with ``get``: those a group may lack, e.g. RMSprop's
        ``fused``, and our precision options, Note [our options in param
        groups])."""
        getter = _RAW_KEY_GETTERS.get(type(self))
        if getter is None:
            keys = (*_torch_path.path_keys(self._takes_caution), *self._mode_keys)
            always = tuple(k for k in keys if k in self.defaults)
            optional = (*(k for k in keys if k not in self.defaults), *PRECISION_DEFAULTS)
            if always:
                present = operator.itemgetter(*always)
                getter = lambda g: (present(g), *map(g.get, optional))  # noqa: E731
            else:
                getter = lambda g: tuple(map(g.get, optional))  # noqa: E731
            _RAW_KEY_GETTERS[type(self)] = getter
        return getter(group)

    def _hyperparameter_lists(self, groups) -> list:
        """One list per float hyperparameter of the op (its order), one
        float per group: the per-step hot path of ``_hyperparameters``."""
        names = _ops.SIGNATURES[self._op_name].hyperparameters
        if self._hyperparameters_are_group_options:
            return [list(map(float, column)) for column in zip(*map(operator.itemgetter(*names), groups))]
        per_group = list(map(self._hyperparameters, groups))
        # (by the op's names, not the dicts' order)
        return [list(map(operator.itemgetter(name), per_group)) for name in names]

    def _group_key(self, group) -> tuple:
        """Everything of a group that decides its buckets: the kernel mode
        and the precision options."""
        if self._unfused(group):
            return None
        return (self._mode(group), *map(group.get, PRECISION_DEFAULTS))

    def _hyperparameters(self, group) -> dict:
        """This group's per-group op arguments other than lr, as floats, by
        the op's names (its schema's ``float[]`` lists)."""
        if not self._hyperparameters_are_group_options:
            raise NotImplementedError
        return {name: to_float(group[name]) for name in _ops.SIGNATURES[self._op_name].hyperparameters}

    def _sparse_step(self, group, params, grads, is_new) -> None:
        """Updates params with sparse gradients (SGD, Adagrad); ``is_new[i]``
        says the param's state was created for this step."""
        raise NotImplementedError

    def _check_sparse(self, group, param, grad, is_new: bool) -> None:
        """Raises if this sparse gradient cannot be applied (``is_new``: the
        param's state was created for this step)."""

    @property
    def grad_norm(self):
        """The global L2 norm of the gradients (unscaled under AMP) that the
        last step with ``max_grad_norm`` measured, before clipping: a 0-d
        tensor on the first gradient's device (reading its value syncs
        with the device); None before such a step. ``max_grad_norm=inf``
        measures it without clipping. Under AMP a skipped step's norm is
        inf or nan."""
        return self._grad_norm_cell[0]

    def add_param_group(self, param_group):
        """torch.optim's ``add_param_group`` (the constructor's too), after
        our checks of our options the group will have (its own, else the
        defaults'), as the constructor checks them: before the group is
        added, where a step would refuse them later."""
        if isinstance(param_group, dict):
            check_group_options(type(self).__name__, {**self.defaults, **param_group},
                                  self._takes_caution)
        super().add_param_group(param_group)
        self._plan = None

    def _is_unset_option(self, key, value) -> bool:
        """Whether ``key`` is an option of ours left at its unset value,
        which a param group does not hold (Note [our options in param
        groups])."""
        unset = self._unset_options
        return key in unset and value is unset[key]

    # The group options that a pickle or checkpoint of an older version (of
    # torch, timm, lion-pytorch or ours) may lack, with the value each gets
    # on unpickling and in load_state_dict (torch.optim's classes fill them
    # in with setdefault in their own __setstate__).
    _setstate_defaults: dict = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        # (a pickle of an older version: its groups hold every option)
        for group in (state.get("defaults", {}), *state.get("param_groups", ())):
            for key in [k for k, v in group.items() if self._is_unset_option(k, v)]:
                del group[key]
        for group in self.param_groups:
            for key, value in self._setstate_defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_grad_norm_cell", [None])
        if not isinstance(self.state, OptimizerState):
            self.state = OptimizerState(self.state)
        self._plan = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_plan", None)
        if self._unchecked_masters:
            # (still to be checked in the copy: Note [a loaded master copy];
            # the pickle's memo maps these params to the copy's)
            state["_unchecked_masters"] = self._unchecked_masters
        return state
