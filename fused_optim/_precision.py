"""The precision policy: our mixed-precision options (master weights, state
dtype, stochastic rounding), how they are validated, and how they decide
the storage of a param's update (``Precision``)."""

from __future__ import annotations

import torch

from fused_optim import _C
from fused_optim._bucket import Precision

# Group options of ours (not torch.optim's) that every fused optimizer takes.
PRECISION_DEFAULTS = {"master_weights": False, "state_dtype": None, "stochastic_rounding": False}
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# A state_dtype may also be given by name (a config file's "bfloat16"); a
# saved param group holds it by name (torch's state-dict tools take no dtype
# object), and wrappers that copy saved groups into live ones (ZeRO's load,
# torch.optim._stateless's swap-in) put that name in a live group.
_STATE_DTYPE_NAMES = {name: dtype for dtype in (torch.float32, torch.bfloat16)
                      for name in (str(dtype), str(dtype).removeprefix("torch."))}


def as_state_dtype(value):
    """A state_dtype option as a dtype (None for None); a value that names
    none is returned as it is, for the check to refuse."""
    return _STATE_DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


def check_precision_keywords(master_weights, state_dtype, stochastic_rounding) -> dict:
    """Validates the mixed-precision keywords; returns them as group options."""
    state_dtype = as_state_dtype(state_dtype)
    if state_dtype not in _STATE_DTYPES:
        raise ValueError(
            "state_dtype must be None, torch.float32 or torch.bfloat16 (or its name), "
            f"got {state_dtype!r}"
        )
    if master_weights and stochastic_rounding:
        raise ValueError(
            "master_weights=True and stochastic_rounding=True exclude each other: the "
            "float32 master copy already keeps the bits that stochastic rounding saves"
        )
    return {
        "master_weights": bool(master_weights),
        "state_dtype": state_dtype,
        "stochastic_rounding": bool(stochastic_rounding),
    }


# Every legal (param dtype, state dtype, master weights, stochastic
# rounding) of an op call: the one table the kernels and their checks use
# (csrc/include/fused_optim/storage_table.h), read from the extension.
_DTYPE_OF_NAME = {"float32": torch.float32, "float64": torch.float64,
                  "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_TABLE = frozenset(
    (_DTYPE_OF_NAME[param], _DTYPE_OF_NAME[state], master, rounding)
    for param, state, master, rounding in _C.storage_table()
)


def is_legal_storage(param_dtype: torch.dtype, precision: Precision) -> bool:
    """Whether the kernels store params of ``param_dtype`` this way."""
    return (param_dtype, precision.state_dtype, precision.master_weights,
            precision.stochastic_rounding) in STORAGE_TABLE


# Note [state kept wide]
# A param turned bf16/fp16 after its state was made (`model.bfloat16()`
# after building the optimizer: Adagrad's sums exist from construction on;
# a loss whose weights are cast to the autocast dtype at each forward, as
# pytorch-metric-learning's ArcFaceLoss does, after a resume) keeps its
# float32 state in torch.optim: its code updates a bf16 param from float32
# state (its Adam family raises instead: lerp of mixed dtypes). Converting
# that state to the param's dtype would lose what it holds: a bf16 Adagrad
# sum stops growing at 256, and 2,000 steps later the update was 2.8x
# torch's. So without a state_dtype option a bf16/fp16 param whose state
# holds a float32 tensor is stored as under state_dtype=torch.float32 (a
# legal storage for both dtypes, with or without stochastic rounding): its
# state stays float32, and state it lacks is made float32 (one state dtype
# per param). A state_dtype option still converts (it asks for it), and a
# load still casts the state to the param's dtype, as torch.optim's
# load_state_dict does.


def precision_of(group, dtype: torch.dtype, state_tensors=()) -> Precision:
    """How a param of `dtype` in `group` is stored: master weights only for
    fp16/bf16 params, stochastic rounding only for bf16 params without them;
    the state in ``state_dtype``, else float32 with master weights or where
    the param's existing state tensors (``state_tensors``, its dense state;
    None for a missing one) hold a float32 one (Note [state kept wide]),
    else the param dtype. (Complex params are updated as real views of
    their dtype.)"""
    low = dtype in _LOW_PRECISION
    master = low and bool(group.get("master_weights", False))
    state_dtype = as_state_dtype(group.get("state_dtype"))
    if state_dtype is None:
        kept_wide = precision_reads_state(dtype) and any(
            isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
            for tensor in state_tensors)
        state_dtype = torch.float32 if master or kept_wide else dtype
    rounding = dtype == torch.bfloat16 and bool(group.get("stochastic_rounding", False))
    return Precision(master, state_dtype, rounding)


def precision_reads_state(dtype: torch.dtype) -> bool:
    """Whether precision_of reads the state tensors of a param of ``dtype``
    (Note [state kept wide]): for fp16/bf16 params only."""
    return dtype in _LOW_PRECISION


def dense_state(state: dict | None, names: tuple) -> tuple:
    """A param's state tensors of ``names`` (None where missing), as
    precision_of reads them (Note [state kept wide])."""
    return tuple(state.get(name) for name in names) if state else ()


def real_dtype(param) -> torch.dtype:
    """The dtype the kernels see: complex params are updated as real views."""
    return param.real.dtype if param.is_complex() else param.dtype


def state_dtype_of(param, precision: Precision) -> torch.dtype:
    """The dtype of a param's state tensors (complex params: complex)."""
    return param.dtype if param.is_complex() else precision.state_dtype
