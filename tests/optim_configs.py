"""The data the test suite runs on: ONE row per optimizer (everything the
table-driven tests know of it), the numerics policy, and the error inputs
(tests are data-driven, every tolerance is reviewed data).

Adding an optimizer to the tests is adding its :class:`OptimizerRow` to
``ROWS``; the tables the test modules import (``OPTIM_CONFIGS``,
``GROUP_OVERRIDES``, ``CONSTRUCTOR_ERRORS``, ...) are read from the rows,
and what torch.optim itself says (which keywords its constructor takes,
which group keys its ``__setstate__`` fills in) is read from torch.

Test modules import from here; nothing in this file asserts anything but
the shape of the rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Protocol, Sequence

import torch

import fused_optim
from fused_optim import _reference

# Optimizers that torch.optim lacks: their oracle is the class of the same
# name in fused_optim._reference (REFERENCE_CLASSES), a plain
# torch.optim.Optimizer over the per-tensor rule, which every table-driven
# test then uses as it uses torch.optim.<name>.
NOT_IN_TORCH = tuple(_reference.REFERENCE_CLASSES)


def torch_class(name: str):
    """torch.optim.<name>, or the reference class of an optimizer torch lacks."""
    reference = _reference.REFERENCE_CLASSES.get(name)
    return reference if reference is not None else getattr(torch.optim, name)


# ---------------------------------------------------------------------------
# Optimizer configurations
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One way of constructing an optimizer.

    `kwargs` are passed unchanged to both `torch.optim.<name>` and
    `fused_optim.<name>`; the torch side additionally gets `foreach=False`
    (its single-tensor for-loop, the reference of the numerics policy below).
    """

    id: str
    name: str
    kwargs: dict[str, Any]
    # Included in the 1_000_003-element runs (one feature-rich config per
    # optimizer, to keep CI fast).
    large: bool = False

    @property
    def torch_cls(self):
        return torch_class(self.name)

    @property
    def ours_cls(self):
        return getattr(fused_optim, self.name)

    @property
    def unfused(self):
        """Whether its groups are stepped by the plain per-tensor code, not
        the fused kernels (timm's caution=True: Note [cautious groups] in
        fused_optim/_reference.py), which takes no precision option and
        steps params on any device, as torch.optim's code does."""
        return bool(self.kwargs.get("caution"))

    @property
    def lr(self):
        return self.kwargs.get("lr", default_kwarg(self.name, "lr"))

    def __str__(self):
        return self.id


def default_kwarg(name: str, kwarg: str):
    return inspect.signature(torch_class(name)).parameters[kwarg].default


class Chooser(Protocol):
    """What a row's option draws choose with: hypothesis's ``draw`` in
    test_properties, a ``random.Random`` in test_lifecycles (each wraps its
    own in these two calls)."""

    def choice(self, values: Sequence) -> Any: ...

    def chance(self, p: float) -> bool: ...  # (hypothesis: a boolean, p ignored)


def _no_options(c: Chooser, o: dict, *rest) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class OptimizerRow:
    """One optimizer's row in the test tables: everything the table-driven
    tests know of it, in one place."""

    name: str
    # Constructor kwargs by config id (OptimConfig); together they use every
    # constructor option. Learning rates are larger than the defaults so that
    # parameters move by many ulps per step and a skipped or wrong update
    # cannot hide under a tolerance.
    configs: dict[str, dict[str, Any]]
    # The id of the feature-rich config of the expensive tests
    # (ONE_PER_OPTIMIZER: 1_000_003-element runs, AMP, mixed precision).
    large: str
    # Two param groups that differ from the constructor defaults in numbers
    # and in the flags: the mode flags (amsgrad, nesterov, centered,
    # momentum on/off), which the ops take per call, so the classes split
    # such groups across calls, and the per-group ones (maximize, decoupled
    # decay), which one call carries.
    group_overrides: tuple[dict[str, Any], dict[str, Any]]
    # Hyperparameters written into every group mid-run (torch.optim reads
    # them at every step, so must ours; a plan cached by mode flags must
    # notice). Only changes torch itself supports mid-run: turning RMSprop
    # momentum or Adam amsgrad on mid-run is a KeyError in torch (see
    # modes_turned_on).
    mid_run_changes: dict[str, Any]
    # The names of the per-param state (torch's names).
    state_names: frozenset[str]
    # Constructor errors beyond COMMON_CONSTRUCTOR_ERRORS, (id, kwargs,
    # torch's message verbatim); an id of a common error replaces it (the
    # class words that refusal differently).
    constructor_errors: tuple[tuple[str, dict[str, Any], str], ...]
    # One step of the rule in _reference with every keyword given, compared
    # with the class in float64 (test_reference).
    reference_cases: tuple[dict[str, Any], ...]
    # Option draws beyond lr, weight_decay and maximize: (chooser, options)
    # -> None, adding to the options. property_options: test_properties'
    # groups (every mode, tame values); parity_options(c, kw, eps): its
    # parity with torch (extreme values, eps drawn for the optimizers that
    # take one); lifecycle_options: test_lifecycles' (some options, the
    # rest at defaults).
    property_options: Callable[[Chooser, dict], None] = _no_options
    parity_options: Callable[[Chooser, dict, float], None] = _no_options
    lifecycle_options: Callable[[Chooser, dict], None] = _no_options
    # Options outside what parity with torch in fp32 can be asked of (the
    # result is the rounding noise of one operation order), and so not
    # drawn there: (kw) -> whether kw is such a corner.
    parity_ill_posed: Callable[[dict], bool] = lambda kw: False
    # Whether the optimizer takes sparse gradients (as torch's); the others
    # raise.
    sparse_ok: bool = False
    # Modes that need more state, turned on mid-run from off. torch.optim's
    # Adam and RMSprop raise KeyError for that state when it is missing;
    # ours makes it as zeros (mode_state_made_as_zeros: the tests make the
    # same zeros for torch before its step). SGD and Lars make the momentum
    # buffer from the gradient, in torch as in ours.
    modes_turned_on: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode_state_made_as_zeros: bool = False
    # Weight decay: always decoupled (AdamW, Lion), or the group option that
    # switches it per group (None: none does).
    always_decoupled: bool = False
    decoupled_flag: str | None = None
    # Options under which the optimizer keeps param-shaped state, for tests
    # that need some (SGD and Lars keep none without momentum).
    dense_state_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # For an optimizer whose update reads each tensor's norms
    # (_ops.TENSOR_NORM_OPS): options that adapt its group (weight_decay !=
    # 0), for the tests of norms on DTensor shards (NORM_READING).
    norm_reading_options: dict[str, Any] | None = None
    # Keys a saved param group of ours has beyond its torch.optim (or
    # reference) class's: Lamb's per-group "step", for timm's Lamb (Note
    # [LAMB's step in checkpoints] in fused_optim/lamb.py).
    saved_group_extras: frozenset[str] = frozenset()

    def __post_init__(self):
        assert self.large in self.configs, f"{self.name}: large={self.large!r} is not a config"

    def decoupled(self, kw: dict) -> bool:
        """Whether options ``kw`` decay the weights decoupled from the gradient."""
        return self.always_decoupled or bool(self.decoupled_flag and kw.get(self.decoupled_flag))


# ----- draws shared by several rows ------------------------------------------


def _momentum_draws(c: Chooser, o: dict, momenta: Sequence[float]) -> None:
    # (torch's rule: nesterov needs a momentum and zero dampening)
    o["momentum"] = c.choice(momenta)
    if o["momentum"]:
        o["nesterov"] = c.chance(0.5)
        o["dampening"] = 0.0 if o["nesterov"] else c.choice([0.0, 0.3])


def _sgd_lifecycle_options(c: Chooser, o: dict) -> None:
    o["momentum"] = c.choice([0.0, 0.9])
    if o["momentum"] and c.chance(0.5):
        o["nesterov"] = True
    elif c.chance(0.3):
        o["dampening"] = 0.3


def _extreme_betas(c: Chooser) -> tuple[float, float]:
    return (c.choice([0.0, 0.5, 0.9, 0.9999]), c.choice([0.9, 0.999, 0.99999]))


def _some_betas(c: Chooser, o: dict) -> None:
    if c.chance(0.4):
        o["betas"] = (c.choice([0.5, 0.9]), c.choice([0.95, 0.999]))


def _flag_and_betas(flag: str, lifecycle_chance: float) -> dict[str, Callable]:
    """The draws of an Adam-like row: its one bool option (``flag``) and,
    but for property_options, the betas."""

    def property_options(c: Chooser, o: dict) -> None:
        o[flag] = c.chance(0.5)

    def parity_options(c: Chooser, kw: dict, eps: float) -> None:
        kw.update({"eps": eps, flag: c.chance(0.5), "betas": _extreme_betas(c)})

    def lifecycle_options(c: Chooser, o: dict) -> None:
        o[flag] = c.chance(lifecycle_chance)
        _some_betas(c, o)

    return dict(property_options=property_options, parity_options=parity_options,
                lifecycle_options=lifecycle_options)


# Constructor errors of every optimizer: torch's messages.
COMMON_CONSTRUCTOR_ERRORS = (
    ("neg_lr", dict(lr=-1), "Invalid learning rate: -1"),
    ("neg_lr_float", dict(lr=-0.5), "Invalid learning rate: -0.5"),
    ("lr_tensor_2_elements", dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
)
SGD_ERRORS = (  # (torch.optim.SGD's checks, timm's Lars's too)
    ("neg_momentum", dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ("nesterov_no_momentum", dict(nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    ("nesterov_dampening", dict(nesterov=True, momentum=0.9, dampening=0.1),
     "Nesterov momentum requires a momentum and zero dampening"),
)
BETA_ERRORS = (
    ("beta0_one", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    ("beta0_neg", dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    ("beta1_one", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    ("beta1_neg", dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
)
ADAM_ERRORS = (  # (torch.optim.Adam's; RAdam and NAdam take no tensor betas)
    ("neg_eps", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    *BETA_ERRORS,
    ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
)
TENSOR_BETAS_ERROR = ("betas_mixed_types", dict(betas=(torch.tensor(0.9), 0.999)),
                      "betas must be either both floats or both Tensors")
# timm's refusal of a corrected decay (Lion, Lamb) without a positive peak lr.
CORRECTED_ZERO_LR = ("corrected_zero_lr", dict(lr=0.0, corrected_weight_decay=True),
                     "Corrected weight decay requires a positive max lr, got 0.0. "
                     "Construct the optimizer with the peak lr.")


# ----- the rows ----------------------------------------------------------------

def _sgd_property_options(c: Chooser, o: dict) -> None:
    _momentum_draws(c, o, [0.0, 0.9])


def _sgd_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    _momentum_draws(c, kw, [0.0, 0.5, 0.9, 0.999])


SGD = OptimizerRow(
    "SGD",
    # momentum, dampening, nesterov, weight_decay, maximize
    configs={
        "sgd": dict(lr=0.1),
        "sgd_momentum": dict(lr=0.1, momentum=0.9),
        "sgd_momentum_dampening_wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        "sgd_nesterov_wd_maximize": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02,
                                         maximize=True),
        "sgd_wd_maximize": dict(lr=0.1, weight_decay=0.1, maximize=True),
    },
    large="sgd_nesterov_wd_maximize",
    group_overrides=(
        dict(lr=0.03, momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.05),
        dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.0, maximize=True),
    ),
    mid_run_changes=dict(momentum=0.5, weight_decay=0.05),  # (momentum 0 -> 0.5 makes buffers)
    state_names=frozenset({"momentum_buffer"}),
    constructor_errors=SGD_ERRORS,
    reference_cases=(
        dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1, nesterov=False,
             maximize=False),
        dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True),
    ),
    property_options=_sgd_property_options,
    parity_options=_sgd_parity_options,
    lifecycle_options=_sgd_lifecycle_options,
    sparse_ok=True,
    modes_turned_on=dict(momentum=0.9),
    dense_state_options=dict(momentum=0.9),
)


def _adagrad_property_options(c: Chooser, o: dict) -> None:
    o["lr_decay"] = c.choice([0.0, 0.1])


def _adagrad_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    kw.update(eps=eps, lr_decay=c.choice([0.0, 0.5]),
              initial_accumulator_value=c.choice([0.0, 0.1]))


def _adagrad_lifecycle_options(c: Chooser, o: dict) -> None:
    o.update(lr_decay=c.choice([0.0, 0.05]), eps=c.choice([1e-10, 1e-5]))


ADAGRAD = OptimizerRow(
    "Adagrad",
    # lr_decay, weight_decay, initial_accumulator_value, eps, maximize
    configs={
        "adagrad": dict(lr=0.1),
        "adagrad_decay_wd_init_eps": dict(lr=0.1, lr_decay=0.01, weight_decay=0.05,
                                          initial_accumulator_value=0.1, eps=1e-6),
        "adagrad_maximize_init": dict(lr=0.05, maximize=True, initial_accumulator_value=0.5),
    },
    large="adagrad_decay_wd_init_eps",
    group_overrides=(
        dict(lr=0.03, lr_decay=0.1, eps=1e-5),
        dict(lr=0.2, weight_decay=0.1, maximize=True),
    ),
    mid_run_changes=dict(lr_decay=0.05, weight_decay=0.02, eps=1e-4),
    state_names=frozenset({"step", "sum"}),
    constructor_errors=(
        ("neg_lr_decay", dict(lr_decay=-1), "Invalid lr_decay value: -1"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        ("neg_initial_accumulator_value", dict(initial_accumulator_value=-1.5),
         "Invalid initial_accumulator_value value: -1.5"),
        ("neg_eps", dict(eps=-1e-10), "Invalid epsilon value: -1e-10"),
    ),
    reference_cases=(dict(lr=1e-1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False),),
    property_options=_adagrad_property_options,
    parity_options=_adagrad_parity_options,
    lifecycle_options=_adagrad_lifecycle_options,
    sparse_ok=True,
)


def _rmsprop_property_options(c: Chooser, o: dict) -> None:
    o["momentum"] = c.choice([0.0, 0.5])
    o["centered"] = c.chance(0.5)


def _rmsprop_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    kw.update(eps=eps, alpha=c.choice([0.0, 0.9, 0.99, 0.9999]), momentum=c.choice([0.0, 0.5]),
              centered=c.chance(0.5))


def _rmsprop_lifecycle_options(c: Chooser, o: dict) -> None:
    o.update(alpha=c.choice([0.9, 0.99]), momentum=c.choice([0.0, 0.5]), centered=c.chance(0.5))


RMSPROP = OptimizerRow(
    "RMSprop",
    # alpha, eps, weight_decay, momentum, centered, maximize
    configs={
        "rmsprop": dict(lr=0.01),
        "rmsprop_centered": dict(lr=0.01, alpha=0.9, eps=1e-6, centered=True),
        "rmsprop_momentum_wd": dict(lr=0.01, momentum=0.9, weight_decay=0.01),
        "rmsprop_all": dict(lr=0.005, alpha=0.95, eps=1e-5, weight_decay=0.05, momentum=0.5,
                            centered=True, maximize=True),
    },
    large="rmsprop_all",
    group_overrides=(
        dict(lr=0.003, momentum=0.5, centered=True),
        dict(lr=0.02, alpha=0.8, eps=1e-4, weight_decay=0.1, momentum=0.0, centered=False,
             maximize=True),
    ),
    mid_run_changes=dict(alpha=0.9, eps=1e-4, weight_decay=0.02),
    state_names=frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
    constructor_errors=(
        ("neg_eps", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        ("neg_momentum", dict(momentum=-0.9), "Invalid momentum value: -0.9"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        ("neg_alpha", dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    ),
    reference_cases=(
        dict(lr=1e-2, alpha=0.3, eps=1e-8, weight_decay=0.1, momentum=0.5, centered=True,
             maximize=True),
        dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False),
    ),
    property_options=_rmsprop_property_options,
    parity_options=_rmsprop_parity_options,
    lifecycle_options=_rmsprop_lifecycle_options,
    # centered with alpha = 0 takes the square root of g*g - g*g, a
    # rounding residual (NaN for half of the elements, in torch too)
    parity_ill_posed=lambda kw: bool(kw.get("centered")) and kw["alpha"] == 0.0,
    modes_turned_on=dict(momentum=0.5, centered=True),
    mode_state_made_as_zeros=True,
)


ADAM = OptimizerRow(
    "Adam",
    # betas, eps, weight_decay, amsgrad, maximize
    configs={
        "adam": dict(lr=0.01),
        "adam_wd_amsgrad": dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                amsgrad=True),
        "adam_maximize_wd": dict(lr=0.02, weight_decay=0.01, maximize=True),
    },
    large="adam_wd_amsgrad",
    group_overrides=(
        dict(lr=0.003, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.0, amsgrad=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, amsgrad=False, maximize=True),
    ),
    mid_run_changes=dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05),
    state_names=frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    constructor_errors=(*ADAM_ERRORS, TENSOR_BETAS_ERROR),
    reference_cases=(dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True,
                          maximize=True, decoupled_weight_decay=False),),
    **_flag_and_betas("amsgrad", lifecycle_chance=0.4),
    modes_turned_on=dict(amsgrad=True),
    mode_state_made_as_zeros=True,
    decoupled_flag="decoupled_weight_decay",
)

ADAMW = dataclasses.replace(
    ADAM,
    name="AdamW",
    # the same options, decoupled decay
    configs={
        "adamw": dict(lr=0.01),
        "adamw_all": dict(lr=0.02, betas=(0.85, 0.95), eps=1e-7, weight_decay=0.2, amsgrad=True,
                          maximize=True),
    },
    large="adamw_all",
    group_overrides=(
        dict(lr=0.003, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.0, amsgrad=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.5, amsgrad=False, maximize=False),
    ),
    reference_cases=(dict(lr=1e-2, betas=(0.3, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False,
                          maximize=False, decoupled_weight_decay=True),),
    always_decoupled=True,
    decoupled_flag=None,
)


RADAM_DRAWS = _flag_and_betas("decoupled_weight_decay", lifecycle_chance=0.5)


RADAM = OptimizerRow(
    "RAdam",
    # betas, eps, weight_decay (L2 or decoupled), maximize
    configs={
        "radam": dict(lr=0.01),
        "radam_all": dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                          decoupled_weight_decay=True, maximize=True),
        "radam_wd": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05),
    },
    large="radam_all",
    group_overrides=(
        dict(lr=0.01, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, maximize=True),
    ),
    mid_run_changes=dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05,
                         decoupled_weight_decay=True),
    state_names=frozenset({"step", "exp_avg", "exp_avg_sq"}),
    constructor_errors=ADAM_ERRORS,  # (no tensor betas)
    reference_cases=(
        dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, maximize=True,
             decoupled_weight_decay=False),
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=False,
             decoupled_weight_decay=True),
    ),
    **RADAM_DRAWS,
    decoupled_flag="decoupled_weight_decay",
)


def _nadam_property_options(c: Chooser, o: dict) -> None:
    RADAM_DRAWS["property_options"](c, o)
    o["momentum_decay"] = c.choice([0.0, 4e-3, 0.05])


def _nadam_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    kw["momentum_decay"] = c.choice([0.0, 4e-3, 0.05])
    RADAM_DRAWS["parity_options"](c, kw, eps)


NADAM = OptimizerRow(
    "NAdam",
    # betas, eps, weight_decay (L2 or decoupled), momentum_decay, maximize
    configs={
        "nadam": dict(lr=0.01),
        "nadam_all": dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                          momentum_decay=0.01, decoupled_weight_decay=True, maximize=True),
        "nadam_wd": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, momentum_decay=0.0),
    },
    large="nadam_all",
    group_overrides=(
        dict(lr=0.01, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.1, momentum_decay=0.02,
             decoupled_weight_decay=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, momentum_decay=0.0, maximize=True),
    ),
    mid_run_changes=dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05, momentum_decay=0.01,
                         decoupled_weight_decay=True),
    state_names=frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    constructor_errors=(  # (no tensor betas)
        *ADAM_ERRORS,
        ("neg_momentum_decay", dict(momentum_decay=-0.1), "Invalid momentum_decay value: -0.1"),
    ),
    reference_cases=(
        dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, momentum_decay=0.01,
             maximize=True, decoupled_weight_decay=False),
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, momentum_decay=4e-3,
             maximize=False, decoupled_weight_decay=True),
    ),
    property_options=_nadam_property_options,
    parity_options=_nadam_parity_options,
    lifecycle_options=RADAM_DRAWS["lifecycle_options"],
    decoupled_flag="decoupled_weight_decay",
)


def _lion_property_options(c: Chooser, o: dict) -> None:
    o["betas"] = c.choice([(0.9, 0.99), (0.5, 0.9)])
    o["corrected_weight_decay"] = c.chance(0.5)


def _lion_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    kw.update(betas=(c.choice([0.0, 0.5, 0.9, 1.0]), c.choice([0.9, 0.99, 0.999])))


LION = OptimizerRow(
    "Lion",
    # betas, weight_decay (decoupled), maximize, timm's corrected decay and
    # caution, lion-pytorch's decoupled_weight_decay
    configs={
        "lion": dict(lr=0.01),
        "lion_all": dict(lr=0.005, betas=(0.8, 0.95), weight_decay=0.5, maximize=True),
        "lion_wd": dict(lr=0.003, betas=(0.95, 0.98), weight_decay=0.1),
        # (timm's corrected decay: lr^2 / the constructor's lr; it differs
        # from the plain decay where a group's lr or a schedule's is not the
        # constructor's, as in the multi-group and scheduler tests)
        "lion_corrected": dict(lr=0.004, weight_decay=0.3, corrected_weight_decay=True),
        # (lion-pytorch's decoupled_weight_decay: the decay divided by the
        # constructor's lr, 0.5 here)
        "lion_decoupled": dict(lr=0.004, weight_decay=0.002, use_triton=False,
                               decoupled_weight_decay=True),
        # (timm's caution=True: the plain per-tensor step, Note [cautious groups])
        "lion_cautious": dict(lr=0.01, weight_decay=0.1, caution=True),
    },
    large="lion_all",
    group_overrides=(
        dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.0, maximize=True),
    ),
    mid_run_changes=dict(betas=(0.7, 0.95), weight_decay=0.05),
    state_names=frozenset({"exp_avg"}),
    constructor_errors=(
        ("beta0_above_one", dict(betas=(1.5, 0.99)), "Invalid beta parameter at index 0: 1.5"),
        ("beta0_neg", dict(betas=(-0.1, 0.99)), "Invalid beta parameter at index 0: -0.1"),
        ("beta1_above_one", dict(betas=(0.9, 1.01)), "Invalid beta parameter at index 1: 1.01"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        CORRECTED_ZERO_LR,
        ("decoupled_zero_lr", dict(lr=0.0, decoupled_weight_decay=True),
         "decoupled_weight_decay=True divides the weight decay by the initial lr, which must be "
         "positive, got 0.0"),
    ),
    reference_cases=(
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, maximize=False),
        dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.0, maximize=True),
    ),
    property_options=_lion_property_options,
    parity_options=_lion_parity_options,
    lifecycle_options=_some_betas,
    always_decoupled=True,
)


def _lars_property_options(c: Chooser, o: dict) -> None:
    o["momentum"] = c.choice([0.0, 0.9])
    if o["momentum"]:
        o["nesterov"] = c.chance(0.5)
    o["trust_clip"] = c.chance(0.5)
    o["always_adapt"] = c.chance(0.5)


def _lars_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    _momentum_draws(c, kw, [0.0, 0.5, 0.9, 0.999])
    kw.update(eps=eps, trust_coeff=c.choice([1e-3, 0.02, 1.0]), trust_clip=c.chance(0.5),
              always_adapt=c.chance(0.5))


LARS = OptimizerRow(
    "Lars",
    # (timm's): momentum, dampening, weight_decay (adapts the group),
    # nesterov, trust_coeff, eps, trust_clip, always_adapt, maximize
    configs={
        "lars": dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02),
        "lars_all": dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, trust_coeff=0.02,
                         eps=1e-6, trust_clip=True, maximize=True),
        "lars_nesterov_always": dict(lr=1.0, momentum=0.8, nesterov=True, trust_coeff=0.01,
                                     always_adapt=True),
        "lars_unadapted": dict(lr=0.05),  # (weight_decay 0: plain SGD)
    },
    large="lars_all",
    # (LARS moves a param by about lr * trust_coeff of its own size per
    # step, whatever its scale: large enough here for the bf16 runs to see
    # every update, LOW_PRECISION_PARAM_SCALE)
    group_overrides=(
        dict(lr=0.5, momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.0,
             always_adapt=True, trust_coeff=0.1),
        dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.05, trust_coeff=0.2,
             trust_clip=True, maximize=True),
    ),
    mid_run_changes=dict(momentum=0.5, weight_decay=0.05, trust_coeff=0.01, eps=1e-5,
                         always_adapt=True),
    state_names=frozenset({"momentum_buffer"}),
    constructor_errors=SGD_ERRORS,  # (timm's checks: torch.optim.SGD's)
    reference_cases=(
        dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             trust_coeff=0.02, eps=1e-6, trust_clip=True, always_adapt=False, maximize=True),
        dict(lr=1.0, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True,
             trust_coeff=0.01, eps=1e-8, trust_clip=False, always_adapt=True, maximize=False),
        dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=1e-4, nesterov=False,
             trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, maximize=False),
    ),
    property_options=_lars_property_options,
    parity_options=_lars_parity_options,
    lifecycle_options=_sgd_lifecycle_options,
    modes_turned_on=dict(momentum=0.9),
    dense_state_options=dict(momentum=0.9),
    norm_reading_options=dict(lr=0.5, momentum=0.9, weight_decay=0.01),
)


def _lamb_property_options(c: Chooser, o: dict) -> None:
    o["betas"] = c.choice([(0.9, 0.999), (0.5, 0.9)])
    o["eps"] = c.choice([1e-6, 1e-3])
    for flag in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt",
                 "decoupled_decay", "corrected_weight_decay"):
        o[flag] = c.chance(0.5)
    o["max_grad_norm"] = c.choice([None, 1.0])  # (1.0: clipped, the default)


def _lamb_parity_options(c: Chooser, kw: dict, eps: float) -> None:
    kw.update(eps=eps, betas=_extreme_betas(c), bias_correction=c.chance(0.5),
              grad_averaging=c.chance(0.5), trust_clip=c.chance(0.5),
              always_adapt=c.chance(0.5), decoupled_decay=c.chance(0.5),
              # None: not clipped; 1.0 (the default) clips most of these
              # gradients, 100.0 those of grad_scale 1e3
              max_grad_norm=c.choice([None, 1.0, 100.0]))


LAMB = OptimizerRow(
    "Lamb",
    # (timm's): bias_correction, betas, eps, weight_decay (adapts the
    # group), grad_averaging, max_grad_norm (on by default), trust_clip,
    # always_adapt, decoupled_decay, maximize, corrected decay, caution
    # (LAMB moves an adapted param by lr of its own norm per step: lr large
    # enough for the bf16/fp16 runs to see every update)
    # (and beta2 0.99, eps 1e-3: with timm's 0.999 and 1e-6 the float16
    # second moments round to (near) 0 in torch-style float16 runs, whose own
    # error then exceeds the whole movement, and the low-precision rule
    # could not see a skipped update)
    configs={
        "lamb": dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3),
        "lamb_all": dict(lr=0.1, bias_correction=False, betas=(0.8, 0.95), eps=1e-3,
                         weight_decay=0.05, grad_averaging=False, max_grad_norm=0.5,
                         trust_clip=True, decoupled_decay=True, maximize=True),
        "lamb_always_unclipped": dict(lr=0.05, weight_decay=0.0, always_adapt=True,
                                      max_grad_norm=None),
        "lamb_unadapted": dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.0),
        "lamb_corrected": dict(lr=0.04, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.2,
                               decoupled_decay=True, corrected_weight_decay=True),
        "lamb_cautious": dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, caution=True),
    },
    large="lamb_all",
    group_overrides=(
        dict(lr=0.03, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.0, always_adapt=True,
             bias_correction=False),
        dict(lr=0.05, betas=(0.95, 0.999), weight_decay=0.1, decoupled_decay=True,
             trust_clip=True, grad_averaging=False, maximize=True),
    ),
    mid_run_changes=dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05, decoupled_decay=True,
                         trust_clip=True),
    state_names=frozenset({"step", "exp_avg", "exp_avg_sq"}),
    # timm's checks and messages; betas: torch.optim.Adam's (timm has none)
    constructor_errors=(
        ("lr_tensor_2_elements", dict(lr=torch.tensor([0.1, 0.2])),
         "learning rate must be a scalar or scalar tensor."),
        ("neg_eps", dict(eps=-1e-8), "Invalid epsilon: -1e-08"),
        *BETA_ERRORS,
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay: -0.1"),
        CORRECTED_ZERO_LR,
    ),
    # (the rule without the class's global-norm clipping: the test runs the
    # class with max_grad_norm=None)
    reference_cases=(
        dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, bias_correction=True,
             grad_averaging=True, trust_clip=True, always_adapt=False, decoupled_decay=False,
             maximize=True),
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, bias_correction=False,
             grad_averaging=False, trust_clip=False, always_adapt=False, decoupled_decay=True,
             maximize=False),
        dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
             grad_averaging=True, trust_clip=False, always_adapt=True, decoupled_decay=False,
             maximize=False),
        dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
             grad_averaging=True, trust_clip=True, always_adapt=False, decoupled_decay=False,
             maximize=False),
    ),
    property_options=_lamb_property_options,
    parity_options=_lamb_parity_options,
    lifecycle_options=_some_betas,
    # LAMB with lr >= 1: an adapted step moves a param by lr times its own
    # norm, an unadapted one without bias correction by up to
    # lr / sqrt(1 - beta2) per element. With lr 10 the small elements left
    # are the rounding residue of much larger terms; with lr 1 a param
    # parallel to its update (any 1-element param) becomes p - p, exactly
    # 0 or a residue, whose trust ratio (1 at norm 0) then differs. Ours
    # and the float32 reference are equally far from float64 there.
    parity_ill_posed=lambda kw: kw["lr"] >= 1,
    decoupled_flag="decoupled_decay",
    # (and its default clipping, max_grad_norm=1.0, which the tests'
    # gradients exceed)
    norm_reading_options=dict(lr=0.05, weight_decay=0.01),
    saved_group_extras=frozenset({"step"}),
)


# The optimizers, in the order the tests draw and list them.
ROWS = (SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, RADAM, NADAM, LION, LARS, LAMB)
ROW = {row.name: row for row in ROWS}
OPTIMIZER_NAMES = tuple(ROW)


# ----- the tables the test modules read, from the rows (and torch) ----------------

OPTIM_CONFIGS: list[OptimConfig] = [
    OptimConfig(cid, row.name, kwargs, large=cid == row.large)
    for row in ROWS for cid, kwargs in row.configs.items()]
CONFIGS_BY_ID = {c.id: c for c in OPTIM_CONFIGS}
LARGE_CONFIGS = [c for c in OPTIM_CONFIGS if c.large]
# One feature-rich config per optimizer, for the more expensive tests.
ONE_PER_OPTIMIZER = LARGE_CONFIGS

GROUP_OVERRIDES: dict[str, list[dict[str, Any]]] = {
    row.name: list(row.group_overrides) for row in ROWS}
MID_RUN_CHANGES: dict[str, dict[str, Any]] = {row.name: row.mid_run_changes for row in ROWS}
MODES_TURNED_ON: dict[str, dict[str, Any]] = {
    row.name: row.modes_turned_on for row in ROWS if row.modes_turned_on}
# The state each mode needs.
STATE_OF_MODE = {"amsgrad": "max_exp_avg_sq", "centered": "grad_avg",
                 "momentum": "momentum_buffer"}
MODE_STATE_MADE_AS_ZEROS = tuple(row.name for row in ROWS if row.mode_state_made_as_zeros)
STATE_NAMES = {row.name: set(row.state_names) for row in ROWS}
SAVED_GROUP_EXTRAS = {row.name: set(row.saved_group_extras) for row in ROWS
                      if row.saved_group_extras}
DENSE_STATE_OPTIONS = {row.name: row.dense_state_options for row in ROWS}
NORM_READING = {row.name: row.norm_reading_options for row in ROWS
                if row.norm_reading_options is not None}
SPARSE_OK = tuple(row.name for row in ROWS if row.sparse_ok)
SPARSE_REJECTED = tuple(row.name for row in ROWS if not row.sparse_ok)


def _takes(name: str, keyword: str) -> bool:
    return keyword in inspect.signature(torch_class(name)).parameters


# Optimizers whose torch 2.13 constructor takes `fused` (torch's RMSprop does
# not, and ours has exactly torch's signatures, so neither does ours), and
# those whose torch counterpart takes `capturable`.
HAS_FUSED = tuple(n for n in OPTIMIZER_NAMES if _takes(n, "fused"))
HAS_CAPTURABLE = tuple(n for n in OPTIMIZER_NAMES if _takes(n, "capturable"))


def _keys_setstate_fills_in(name: str) -> list[str]:
    """The group keys that torch.optim's ``__setstate__`` fills in (with
    setdefault, or set) when an (old) checkpoint lacks them: read from
    torch, by handing it groups that hold nothing but their params."""
    cls = torch_class(name)
    state = cls([torch.nn.Parameter(torch.zeros(2))]).__getstate__()
    state["param_groups"] = [{"params": g["params"]} for g in state["param_groups"]]
    fresh = cls.__new__(cls)
    fresh.__setstate__(state)
    return [k for k in fresh.param_groups[0] if k != "params"]


# Group keys that torch.optim's __setstate__ fills in when a checkpoint
# lacks them; ours must do the same.
SETSTATE_DEFAULTED_KEYS = {name: _keys_setstate_fills_in(name) for name in OPTIMIZER_NAMES}

# Keywords of ours beyond torch.optim's (the mixed-precision options), with
# their defaults: every class takes them, keyword-only, after torch's, and
# they are param_group keys.
OUR_KEYWORDS = {
    "master_weights": False, "state_dtype": None, "stochastic_rounding": False, "max_grad_norm": None,
}


# ---------------------------------------------------------------------------
# Numerics policy
# ---------------------------------------------------------------------------

# fp32/fp64: torch.testing.assert_close defaults, on params and every state
# tensor, after every step.
EXACT_DTYPES = (torch.float32, torch.float64)

# fp16/bf16: ours' max-abs error against a float64 torch.optim run from the
# same starting values must be at most LOW_PRECISION_RATIO x torch.optim's own
# same-dtype error against that run (flash-attention's rule).
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
LOW_PRECISION_RATIO = 2.0
# Initial parameter magnitude of the fp16/bf16 runs (values ~ 0.1 * N(0, 1)).
# Why 0.1: with |p| ~ 1 a bf16 ulp (2^-7..2^-6) is as large as an Adam step
# (lr 0.01), so torch.optim's own bf16 error is about the size of the whole
# 10-step movement and 2x it could not tell a skipped update from a correct
# one. At 0.1 torch's error is 16x-400x smaller than the median movement for
# every config (measured), and run_low_precision asserts that margin.
LOW_PRECISION_PARAM_SCALE = 0.1


def low_precision_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Error that no implementation storing `dtype` can be asked to beat.

    Why: a value stored in `dtype` is rounded once, to within eps/2 relative.
    When torch.optim happens to round every element exactly like the float64
    run its error is 0 (or a sliver of an ulp) and 2x that would demand
    bit-exactness with float64, which is not a property of the math. One eps
    of the largest magnitude (2 half-ulps) is the floor.
    """
    if ref.numel() == 0:
        return 0.0
    return torch.finfo(dtype).eps * ref.abs().max().item()


# ---------------------------------------------------------------------------
# Error inputs
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    id: str
    name: str  # optimizer class name
    kwargs: dict[str, Any]
    exc: type
    match: str  # regex searched in str(exception)
    # True: torch.optim raises the same exception with this message (checked
    # by test_error_table_is_torchs), so ours must too. False: a contract of
    # ours only (keywords we accept but cannot honour).
    from_torch: bool = True


def _msg(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _constructor_errors() -> list[ErrorCase]:
    cases: list[ErrorCase] = []
    for row in ROWS:
        own = {cid: (cid, kw, text) for cid, kw, text in row.constructor_errors}
        common = [own.pop(cid, (cid, kw, text)) for cid, kw, text in COMMON_CONSTRUCTOR_ERRORS]
        name = row.name
        for cid, kw, text in common + list(own.values()):
            cases.append(ErrorCase(f"{name}-{cid}", name, kw, ValueError, _msg(text)))
        # Implementation keywords: torch's own refusals, same type and text.
        if name in HAS_FUSED:
            cases.append(ErrorCase(f"{name}-fused_foreach", name, dict(fused=True, foreach=True),
                                   RuntimeError, _msg("`fused` and `foreach` cannot be `True` together.")))
            cases.append(ErrorCase(f"{name}-fused_differentiable", name,
                                   dict(fused=True, differentiable=True), RuntimeError,
                                   _msg("`fused` does not support `differentiable`")))
            # Ours: the precision options live in the fused kernels only.
            cases.append(ErrorCase(f"{name}-unfused_master_weights", name,
                                   dict(fused=False, master_weights=True), ValueError,
                                   "master_weights need.*fused=False", from_torch=False))
        if name in NOT_IN_TORCH:
            continue  # (no differentiable keyword: no torch implementation to run)
        cases.append(ErrorCase(f"{name}-differentiable_state_dtype", name,
                               dict(differentiable=True, state_dtype=torch.bfloat16), ValueError,
                               "state_dtype need.*differentiable=True", from_torch=False))
    for name in ("Adam", "AdamW"):
        # A tensor lr or betas with foreach=True: refused as torch does,
        # whether torch's foreach code (fused=False) or our fused step
        # (fused=None) would run (Note [implementation keywords]).
        for fused in (False, None):
            cases.append(ErrorCase(f"{name}-foreach_tensor_lr-fused_{fused}", name,
                                   dict(fused=fused, foreach=True, lr=torch.tensor(0.01)),
                                   ValueError,
                                   _msg("lr as a Tensor is not supported for capturable=False "
                                        "and foreach=True")))
            cases.append(ErrorCase(f"{name}-foreach_tensor_betas-fused_{fused}", name,
                                   dict(fused=fused, foreach=True,
                                        betas=(torch.tensor(0.9), torch.tensor(0.99))),
                                   ValueError,
                                   _msg("betas[0] as a Tensor is not supported for "
                                        "capturable=False and foreach=True")))
    return cases


CONSTRUCTOR_ERRORS: list[ErrorCase] = _constructor_errors()

# Keywords that are accepted with these values (and must not raise); the
# `fused` ones only where torch has the keyword (HAS_FUSED).
ACCEPTED_KWARGS: list[dict[str, Any]] = [
    dict(foreach=None),
    dict(foreach=True),
    dict(foreach=False),
    dict(fused=None),
    dict(fused=True),
    dict(fused=False),
    dict(fused=False, foreach=True),
    dict(fused=False, foreach=False),
    dict(differentiable=False),
    dict(differentiable=True),
    dict(differentiable=True, foreach=False),
]

# Step-time errors: (what is wrong, exception types accepted, message regex).
# The message of the sparse errors is torch's (it contains "sparse"); the
# layout errors have no torch counterpart message, so any clear exception is
# accepted but it MUST be raised before anything is written.
STEP_ERROR_EXCEPTIONS = (RuntimeError, ValueError, TypeError, NotImplementedError)
SPARSE_STEP_ERROR = (RuntimeError, "sparse")
