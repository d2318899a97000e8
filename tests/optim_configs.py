"""The data the test suite runs on: ONE table of optimizer configurations and
ONE table of error inputs (tests are data-driven, every
tolerance is reviewed data).

Test modules import from here; nothing in this file asserts anything.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

import fused_optim
from fused_optim import _reference

OPTIMIZER_NAMES = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "NAdam", "Lion", "Lars",
                   "Lamb")

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
    import inspect

    return inspect.signature(torch_class(name)).parameters[kwarg].default


# Every constructor option of every optimizer appears in at least one row.
# Learning rates are larger than the defaults so that parameters move by many
# ulps per step and a skipped or wrong update cannot hide under a tolerance.
OPTIM_CONFIGS: list[OptimConfig] = [
    # SGD: momentum, dampening, nesterov, weight_decay, maximize
    OptimConfig("sgd", "SGD", dict(lr=0.1)),
    OptimConfig("sgd_momentum", "SGD", dict(lr=0.1, momentum=0.9)),
    OptimConfig(
        "sgd_momentum_dampening_wd",
        "SGD",
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    ),
    OptimConfig(
        "sgd_nesterov_wd_maximize",
        "SGD",
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02, maximize=True),
        large=True,
    ),
    OptimConfig("sgd_wd_maximize", "SGD", dict(lr=0.1, weight_decay=0.1, maximize=True)),
    # Adagrad: lr_decay, weight_decay, initial_accumulator_value, eps, maximize
    OptimConfig("adagrad", "Adagrad", dict(lr=0.1)),
    OptimConfig(
        "adagrad_decay_wd_init_eps",
        "Adagrad",
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1, eps=1e-6),
        large=True,
    ),
    OptimConfig(
        "adagrad_maximize_init",
        "Adagrad",
        dict(lr=0.05, maximize=True, initial_accumulator_value=0.5),
    ),
    # RMSprop: alpha, eps, weight_decay, momentum, centered, maximize
    OptimConfig("rmsprop", "RMSprop", dict(lr=0.01)),
    OptimConfig("rmsprop_centered", "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6, centered=True)),
    OptimConfig("rmsprop_momentum_wd", "RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    OptimConfig(
        "rmsprop_all",
        "RMSprop",
        dict(
            lr=0.005,
            alpha=0.95,
            eps=1e-5,
            weight_decay=0.05,
            momentum=0.5,
            centered=True,
            maximize=True,
        ),
        large=True,
    ),
    # Adam: betas, eps, weight_decay, amsgrad, maximize
    OptimConfig("adam", "Adam", dict(lr=0.01)),
    OptimConfig(
        "adam_wd_amsgrad",
        "Adam",
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
        large=True,
    ),
    OptimConfig("adam_maximize_wd", "Adam", dict(lr=0.02, weight_decay=0.01, maximize=True)),
    # AdamW: same options, decoupled decay
    OptimConfig("adamw", "AdamW", dict(lr=0.01)),
    OptimConfig(
        "adamw_all",
        "AdamW",
        dict(
            lr=0.02,
            betas=(0.85, 0.95),
            eps=1e-7,
            weight_decay=0.2,
            amsgrad=True,
            maximize=True,
        ),
        large=True,
    ),
    # RAdam: betas, eps, weight_decay (L2 or decoupled), maximize
    OptimConfig("radam", "RAdam", dict(lr=0.01)),
    OptimConfig(
        "radam_all",
        "RAdam",
        dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
             maximize=True),
        large=True,
    ),
    OptimConfig("radam_wd", "RAdam", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05)),
    # NAdam: betas, eps, weight_decay (L2 or decoupled), momentum_decay, maximize
    OptimConfig("nadam", "NAdam", dict(lr=0.01)),
    OptimConfig(
        "nadam_all",
        "NAdam",
        dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, momentum_decay=0.01,
             decoupled_weight_decay=True, maximize=True),
        large=True,
    ),
    OptimConfig("nadam_wd", "NAdam", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05,
                                          momentum_decay=0.0)),
    # Lion: betas, weight_decay (decoupled), maximize
    OptimConfig("lion", "Lion", dict(lr=0.01)),
    OptimConfig(
        "lion_all",
        "Lion",
        dict(lr=0.005, betas=(0.8, 0.95), weight_decay=0.5, maximize=True),
        large=True,
    ),
    OptimConfig("lion_wd", "Lion", dict(lr=0.003, betas=(0.95, 0.98), weight_decay=0.1)),
    # (timm's corrected decay: lr^2 / the constructor's lr; it differs from
    # the plain decay where a group's lr or a schedule's is not the
    # constructor's, as in the multi-group and scheduler tests)
    OptimConfig("lion_corrected", "Lion",
                dict(lr=0.004, weight_decay=0.3, corrected_weight_decay=True)),
    # (lion-pytorch's decoupled_weight_decay: the decay divided by the
    # constructor's lr, 0.5 here)
    OptimConfig("lion_decoupled", "Lion",
                dict(lr=0.004, weight_decay=0.002, use_triton=False, decoupled_weight_decay=True)),
    # (timm's caution=True: the plain per-tensor step, Note [cautious groups])
    OptimConfig("lion_cautious", "Lion", dict(lr=0.01, weight_decay=0.1, caution=True)),
    # Lars (timm's): momentum, dampening, weight_decay (adapts the group),
    # nesterov, trust_coeff, eps, trust_clip, always_adapt, maximize
    OptimConfig("lars", "Lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)),
    OptimConfig(
        "lars_all",
        "Lars",
        dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, trust_coeff=0.02, eps=1e-6,
             trust_clip=True, maximize=True),
        large=True,
    ),
    OptimConfig("lars_nesterov_always", "Lars",
                dict(lr=1.0, momentum=0.8, nesterov=True, trust_coeff=0.01, always_adapt=True)),
    OptimConfig("lars_unadapted", "Lars", dict(lr=0.05)),  # (weight_decay 0: plain SGD)
    # Lamb (timm's): bias_correction, betas, eps, weight_decay (adapts the
    # group), grad_averaging, max_grad_norm (on by default), trust_clip,
    # always_adapt, decoupled_decay, maximize
    # (LAMB moves an adapted param by lr of its own norm per step: lr large
    # enough for the bf16/fp16 runs to see every update)
    # (and beta2 0.99, eps 1e-3: with timm's 0.999 and 1e-6 the float16
    # second moments round to (near) 0 in torch-style float16 runs, whose own
    # error then exceeds the whole movement, and the low-precision rule
    # could not see a skipped update)
    OptimConfig("lamb", "Lamb", dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3)),
    OptimConfig(
        "lamb_all",
        "Lamb",
        dict(lr=0.1, bias_correction=False, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05,
             grad_averaging=False, max_grad_norm=0.5, trust_clip=True, decoupled_decay=True,
             maximize=True),
        large=True,
    ),
    OptimConfig("lamb_always_unclipped", "Lamb",
                dict(lr=0.05, weight_decay=0.0, always_adapt=True, max_grad_norm=None)),
    OptimConfig("lamb_unadapted", "Lamb",
                dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.0)),
    OptimConfig("lamb_corrected", "Lamb",
                dict(lr=0.04, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.2, decoupled_decay=True,
                     corrected_weight_decay=True)),
    OptimConfig("lamb_cautious", "Lamb",
                dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, caution=True)),
]

CONFIGS_BY_ID = {c.id: c for c in OPTIM_CONFIGS}
LARGE_CONFIGS = [c for c in OPTIM_CONFIGS if c.large]
# One feature-rich config per optimizer, for the more expensive tests.
ONE_PER_OPTIMIZER = LARGE_CONFIGS
assert sorted(c.name for c in ONE_PER_OPTIMIZER) == sorted(OPTIMIZER_NAMES)

# Per-group overrides used by the multi-group tests: groups 2 and 3 differ
# from the constructor defaults in numeric hyperparameters AND in the flags:
# the mode flags (amsgrad, nesterov, centered, momentum on/off), which the ops
# take per call, so the classes split such groups across calls, and the
# per-group ones (maximize, decoupled_weight_decay), which one call carries.
GROUP_OVERRIDES: dict[str, list[dict[str, Any]]] = {
    "SGD": [
        dict(lr=0.03, momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.05),
        dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.0, maximize=True),
    ],
    "Adagrad": [
        dict(lr=0.03, lr_decay=0.1, eps=1e-5),
        dict(lr=0.2, weight_decay=0.1, maximize=True),
    ],
    "RMSprop": [
        dict(lr=0.003, momentum=0.5, centered=True),
        dict(lr=0.02, alpha=0.8, eps=1e-4, weight_decay=0.1, momentum=0.0, centered=False, maximize=True),
    ],
    "Adam": [
        dict(lr=0.003, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.0, amsgrad=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, amsgrad=False, maximize=True),
    ],
    "AdamW": [
        dict(lr=0.003, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.0, amsgrad=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.5, amsgrad=False, maximize=False),
    ],
    "RAdam": [
        dict(lr=0.01, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, maximize=True),
    ],
    "NAdam": [
        dict(lr=0.01, betas=(0.5, 0.9), eps=1e-5, weight_decay=0.1, momentum_decay=0.02,
             decoupled_weight_decay=True),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.2, momentum_decay=0.0, maximize=True),
    ],
    "Lion": [
        dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1),
        dict(lr=0.03, betas=(0.95, 0.999), weight_decay=0.0, maximize=True),
    ],
    # (LARS moves a param by about lr * trust_coeff of its own size per
    # step, whatever its scale: large enough here for the bf16 runs to see
    # every update, LOW_PRECISION_PARAM_SCALE)
    "Lars": [
        dict(lr=0.5, momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.0, always_adapt=True,
             trust_coeff=0.1),
        dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.05, trust_coeff=0.2, trust_clip=True,
             maximize=True),
    ],
    "Lamb": [
        dict(lr=0.03, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.0, always_adapt=True,
             bias_correction=False),
        dict(lr=0.05, betas=(0.95, 0.999), weight_decay=0.1, decoupled_decay=True, trust_clip=True,
             grad_averaging=False, maximize=True),
    ],
}

# Hyperparameters written into every group mid-run (torch.optim reads them at
# every step, so must ours; a plan cached by mode flags must notice). Plus
# `maximize` toggled. Only changes torch itself supports mid-run: e.g. turning
# RMSprop momentum or Adam amsgrad on mid-run is a KeyError in torch.
MID_RUN_CHANGES: dict[str, dict[str, Any]] = {
    "SGD": dict(momentum=0.5, weight_decay=0.05),  # momentum 0 -> 0.5 creates buffers
    "Adagrad": dict(lr_decay=0.05, weight_decay=0.02, eps=1e-4),
    "RMSprop": dict(alpha=0.9, eps=1e-4, weight_decay=0.02),
    "Adam": dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05),
    "AdamW": dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05),
    "RAdam": dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05, decoupled_weight_decay=True),
    "NAdam": dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05, momentum_decay=0.01,
                  decoupled_weight_decay=True),
    "Lion": dict(betas=(0.7, 0.95), weight_decay=0.05),
    "Lars": dict(momentum=0.5, weight_decay=0.05, trust_coeff=0.01, eps=1e-5, always_adapt=True),
    "Lamb": dict(betas=(0.7, 0.95), eps=1e-4, weight_decay=0.05, decoupled_decay=True,
                 trust_clip=True),
}

# A mode that needs more state, turned on mid-run (from off), and the state
# each mode needs. torch.optim's Adam and RMSprop raise KeyError for that
# state when it is missing; ours makes it as zeros (for
# MODE_STATE_MADE_AS_ZEROS the tests make the same zeros for torch before
# its step). SGD and Lars make the momentum buffer from the gradient, in
# torch as in ours.
MODES_TURNED_ON: dict[str, dict[str, Any]] = {
    "SGD": dict(momentum=0.9),
    "Lars": dict(momentum=0.9),
    "RMSprop": dict(momentum=0.5, centered=True),
    "Adam": dict(amsgrad=True),
    "AdamW": dict(amsgrad=True),
}
STATE_OF_MODE = {"amsgrad": "max_exp_avg_sq", "centered": "grad_avg",
                 "momentum": "momentum_buffer"}
MODE_STATE_MADE_AS_ZEROS = ("Adam", "AdamW", "RMSprop")

# Names of the per-parameter state of each optimizer (torch's names).
STATE_NAMES = {
    "SGD": {"momentum_buffer"},
    "Adagrad": {"step", "sum"},
    "RMSprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
    "Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "AdamW": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "RAdam": {"step", "exp_avg", "exp_avg_sq"},
    "NAdam": {"step", "mu_product", "exp_avg", "exp_avg_sq"},
    "Lion": {"exp_avg"},
    "Lars": {"momentum_buffer"},
    "Lamb": {"step", "exp_avg", "exp_avg_sq"},
}

# Keys a saved param group of ours has beyond its torch.optim (or
# reference) class's: Lamb's per-group "step", for timm's Lamb (Note
# [LAMB's step in checkpoints] in fused_optim/lamb.py).
SAVED_GROUP_EXTRAS = {"Lamb": {"step"}}

# Group keys that torch.optim's __setstate__ fills in with setdefault when a
# (old) checkpoint lacks them; ours must do the same.
SETSTATE_DEFAULTED_KEYS = {
    "SGD": ["nesterov", "maximize", "foreach", "differentiable", "fused"],
    "Adagrad": ["foreach", "maximize", "differentiable", "fused"],
    "RMSprop": ["momentum", "centered", "foreach", "maximize", "differentiable", "capturable"],
    "Adam": ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
             "decoupled_weight_decay"],
    "AdamW": ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"],
    "RAdam": ["foreach", "maximize", "differentiable", "decoupled_weight_decay", "capturable"],
    "NAdam": ["maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay"],
    "Lion": ["maximize", "corrected_weight_decay", "max_lr_snapshot", "decoupled_weight_decay",
             "caution", "foreach"],
    "Lars": ["nesterov", "maximize", "foreach"],
    "Lamb": ["caution", "decoupled_decay", "maximize", "corrected_weight_decay", "max_lr_snapshot",
             "foreach"],
}

# Optimizers whose torch 2.13 constructor takes `fused` (torch's RMSprop does
# not, and ours has exactly torch's signatures, so neither does ours).
HAS_FUSED = ("SGD", "Adagrad", "Adam", "AdamW")

# Keywords of ours beyond torch.optim's (the mixed-precision options), with
# their defaults: every class takes them, keyword-only, after torch's, and
# they are param_group keys.
OUR_KEYWORDS = {
    "master_weights": False, "state_dtype": None, "stochastic_rounding": False, "max_grad_norm": None,
}

# Optimizers whose torch counterpart takes a `capturable` keyword.
HAS_CAPTURABLE = ("RMSprop", "Adam", "AdamW", "RAdam", "NAdam")

# Optimizers that accept sparse gradients (like torch); the others raise.
SPARSE_OK = ("SGD", "Adagrad")
SPARSE_REJECTED = ("RMSprop", "Adam", "AdamW", "RAdam", "NAdam", "Lion", "Lars", "Lamb")


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


# timm's refusal of a corrected decay (Lion, Lamb) without a positive peak lr.
CORRECTED_ZERO_LR = ("corrected_zero_lr", dict(lr=0.0, corrected_weight_decay=True),
                     "Corrected weight decay requires a positive max lr, got 0.0. "
                     "Construct the optimizer with the peak lr.")


def _constructor_errors() -> list[ErrorCase]:
    cases: list[ErrorCase] = []
    two_lrs = torch.tensor([0.1, 0.2])
    common = [
        ("neg_lr", dict(lr=-1), "Invalid learning rate: -1"),
        ("neg_lr_float", dict(lr=-0.5), "Invalid learning rate: -0.5"),
        ("lr_tensor_2_elements", dict(lr=two_lrs), "Tensor lr must be 1-element"),
    ]
    specific = {
        "SGD": [
            ("neg_momentum", dict(momentum=-0.5), "Invalid momentum value: -0.5"),
            ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
            ("nesterov_no_momentum", dict(nesterov=True),
             "Nesterov momentum requires a momentum and zero dampening"),
            ("nesterov_dampening", dict(nesterov=True, momentum=0.9, dampening=0.1),
             "Nesterov momentum requires a momentum and zero dampening"),
        ],
        "Adagrad": [
            ("neg_lr_decay", dict(lr_decay=-1), "Invalid lr_decay value: -1"),
            ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
            ("neg_initial_accumulator_value", dict(initial_accumulator_value=-1.5),
             "Invalid initial_accumulator_value value: -1.5"),
            ("neg_eps", dict(eps=-1e-10), "Invalid epsilon value: -1e-10"),
        ],
        "RMSprop": [
            ("neg_eps", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
            ("neg_momentum", dict(momentum=-0.9), "Invalid momentum value: -0.9"),
            ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
            ("neg_alpha", dict(alpha=-0.1), "Invalid alpha value: -0.1"),
        ],
    }
    adam_like = [
        ("neg_eps", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        ("beta0_one", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        ("beta0_neg", dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
        ("beta1_one", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        ("beta1_neg", dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        ("betas_mixed_types", dict(betas=(torch.tensor(0.9), 0.999)),
         "betas must be either both floats or both Tensors"),
    ]
    specific["Adam"] = adam_like
    specific["AdamW"] = adam_like
    specific["RAdam"] = adam_like[:-1]  # (torch.optim.RAdam takes no tensor betas)
    specific["NAdam"] = adam_like[:-1] + [  # (torch.optim.NAdam takes no tensor betas)
        ("neg_momentum_decay", dict(momentum_decay=-0.1), "Invalid momentum_decay value: -0.1"),
    ]
    specific["Lion"] = [
        ("beta0_above_one", dict(betas=(1.5, 0.99)), "Invalid beta parameter at index 0: 1.5"),
        ("beta0_neg", dict(betas=(-0.1, 0.99)), "Invalid beta parameter at index 0: -0.1"),
        ("beta1_above_one", dict(betas=(0.9, 1.01)), "Invalid beta parameter at index 1: 1.01"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        CORRECTED_ZERO_LR,
        ("decoupled_zero_lr", dict(lr=0.0, decoupled_weight_decay=True),
         "decoupled_weight_decay=True divides the weight decay by the initial lr, which must be "
         "positive, got 0.0"),
    ]
    specific["Lars"] = specific["SGD"]  # (timm's checks: torch.optim.SGD's)
    specific["Lamb"] = [  # timm's checks and messages; betas: torch.optim.Adam's (timm has none)
        ("neg_eps", dict(eps=-1e-8), "Invalid epsilon: -1e-08"),
        *(case for case in adam_like if case[0].startswith("beta") and case[0] != "betas_mixed_types"),
        ("neg_weight_decay", dict(weight_decay=-0.1), "Invalid weight_decay: -0.1"),
        CORRECTED_ZERO_LR,
    ]
    # (timm's words for a tensor lr of several elements)
    lamb_common = [case if case[0] != "lr_tensor_2_elements"
                   else (case[0], case[1], "learning rate must be a scalar or scalar tensor.")
                   for case in common]
    for name in OPTIMIZER_NAMES:
        for cid, kw, text in (lamb_common if name == "Lamb" else common) + specific[name]:
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
