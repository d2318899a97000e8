"""LAMB (You et al. 2020): layer-wise adaptive moments for large batches, fused."""

from __future__ import annotations

import torch

from fused_optim import _corrected_decay, _docs, _reference
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_implementation_keywords, check_lamb_arguments, to_float
from fused_optim._planning import step_dtype
from fused_optim._precision import PRECISION_DEFAULTS, check_precision_keywords

__all__ = ["Lamb"]


class Lamb(FusedOptimizer):
    _op_name = "lamb_"
    # torch.optim has no LAMB: the plain implementation of the same rule (the
    # tests' oracle), as Lion's and Lars's.
    _torch_class = _reference.Lamb
    _sparse_gradient_error = "Lamb does not support sparse gradients, consider SparseAdam instead."
    # timm's name for the op's per-group decoupled_weight_decay list.
    _group_flag_keys = {"decoupled_weight_decay": "decoupled_decay"}
    _takes_caution = True  # (timm's; Note [cautious groups] in _reference.py)
    # max_grad_norm is timm's group option: always in the groups, as timm's
    # (Note [our options in param groups]).
    _unset_options = dict(PRECISION_DEFAULTS)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        check_lamb_arguments(lr, betas, eps, weight_decay)
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        check_implementation_keywords(
            "Lamb", foreach=foreach, fused=None, differentiable=False, precision=precision,
            caution=caution,
        )
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "grad_averaging": grad_averaging,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "caution": caution,
            "decoupled_decay": decoupled_decay,
            **_corrected_decay.defaults(lr, corrected_weight_decay),
            "maximize": maximize,
            "foreach": foreach,
            **precision,
        }
        super().__init__(params, defaults)

    # (caution, decoupled_decay and foreach as timm's; timm's groups have no
    # maximize)
    _setstate_defaults = {"caution": False, "decoupled_decay": False, "maximize": False, "foreach": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        _corrected_decay.fill_in(self)

    def _state_names(self, mode) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _hyperparameters(self, group) -> dict:
        # (the per-group bools travel as 0.0 or 1.0: the op's per-group
        # lists are float lists)
        beta1, beta2 = group["betas"]
        return {
            "beta1": to_float(beta1),
            "beta2": to_float(beta2),
            "eps": to_float(group["eps"]),
            "weight_decay": to_float(group["weight_decay"]),
            "bias_correction": float(bool(group["bias_correction"])),
            "grad_averaging": float(bool(group["grad_averaging"])),
            "trust_clip": float(bool(group["trust_clip"])),
            "always_adapt": float(bool(group["always_adapt"])),
            # (timm corrects only a decoupled decay)
            "max_lr": _corrected_decay.op_max_lr(group, bool(group["decoupled_decay"])),
        }

    # Note [LAMB's step in checkpoints]
    # timm's Lamb counts steps per param group (group["step"], a 0-d tensor
    # in timm 1.0, an int before, which also drives its bias correction);
    # ours per param (state["step"], as torch.optim's Adam), which equals
    # timm's while every param gets a gradient every step. A saved dict
    # carries both: each group's "step" is the largest of its params'
    # counts, so timm's Lamb continues a checkpoint of ours; loading a dict
    # whose params lack "step" (timm's) takes each param's count from its
    # group's. timm's Lamb keeps the per-param counts of a checkpoint of
    # ours as they were while its group count goes on, and saves both: a
    # group "step" other than the largest of its params' counts says
    # another optimizer stepped since: above them all, timm's, and every
    # param of the group takes the group's count (as timm would go on);
    # below, code that counts per param and kept our group key as it was
    # (torch.optim's load keeps unknown group keys), and the params keep
    # theirs.

    def _export_state_dict(self, state_dict) -> None:
        state = state_dict["state"]
        for group in state_dict["param_groups"]:
            # (timm's groups always have it, None included)
            group.setdefault("max_grad_norm", None)
            steps = [float(state[i]["step"]) for i in group["params"]
                     if i in state and "step" in state[i]]
            if steps:
                # (as timm 1.0's: a 0-d tensor, which
                # torch.distributed.checkpoint saves as a tensor)
                group["step"] = torch.tensor(max(steps), dtype=step_dtype())

    def _import_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved_state = state_dict.get("state", {})
        state = dict(saved_state)
        groups = []
        for group in state_dict.get("param_groups", []):
            group = dict(group)
            step = group.pop("step", None)
            if step is not None:
                params = [i for i in group.get("params", ()) if i in state]
                counts = [float(state[i]["step"]) for i in params if "step" in state[i]]
                # (a count above them all: timm's, stepped on; below: a
                # group key kept by code that counts per param, stale)
                stepped_since = bool(counts) and float(step) > max(counts)
                for i in params:
                    if stepped_since or "step" not in state[i]:
                        state[i] = {**state[i], "step": torch.tensor(float(step), dtype=step_dtype())}
            groups.append(group)
        state_dict["state"] = state
        state_dict["param_groups"] = groups
        return state_dict


Lamb.__doc__ = (
    r"""LAMB (You et al. 2020), fused. torch.optim has no LAMB; the options,
    update and state are timm's ``Lamb`` (``timm/optim/lamb.py``, timm 1.0:
    NVIDIA's NVLAMB variant of apex's ``FusedLAMB``), and checkpoints move
    between the two (Note [LAMB's step in checkpoints] below).

    .. math::
       \begin{aligned}
            &g_t \leftarrow c_t\,(\pm\nabla_\theta f_t(\theta_{t-1})),
                \quad c_t = \min\bigl(1, \tfrac{M}{\lVert g\rVert_{\text{global}} + 10^{-6}}\bigr)
                \quad (-\text{ if } \textit{maximize}) \\
            &m_t \leftarrow \beta_1 m_{t-1} + \beta_3 g_t, \quad
                \beta_3 = 1 - \beta_1 \text{ if } \textit{grad\_averaging} \text{ else } 1 \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &u_t \leftarrow \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}
                \quad (\text{no } 1-\beta^t \text{ without } \textit{bias\_correction}) \\
            &u_t \leftarrow u_t \odot \mathbb{1}[u_t \odot g_t > 0] /
                \max(\mathrm{mean}(\mathbb{1}[u_t \odot g_t > 0]), 10^{-3})
                \quad (\textit{caution} \text{ only}) \\
            &\textbf{if } \lambda \neq 0: \quad
                \textbf{if } \textit{decoupled\_decay}: \theta_{t-1} \leftarrow
                \theta_{t-1} - \gamma_d\lambda\theta_{t-1}
                \quad \textbf{else}: u_t \leftarrow u_t + \lambda\theta_{t-1} \\
            &\textbf{if } \lambda \neq 0 \textbf{ or } \textit{always\_adapt}: \quad
                r_t \leftarrow \begin{cases}
                \lVert\theta_{t-1}\rVert / \lVert u_t\rVert
                    & \lVert\theta_{t-1}\rVert > 0,\ \lVert u_t\rVert > 0 \\
                1 & \text{otherwise} \end{cases}, \quad
                r_t \leftarrow \min(r_t, 1) \text{ if } \textit{trust\_clip},
                \quad u_t \leftarrow r_t u_t \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma u_t
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\epsilon` ``eps``, :math:`\lambda` ``weight_decay``, :math:`M`
    ``max_grad_norm``; state :math:`m` ``exp_avg``, :math:`v`
    ``exp_avg_sq``, :math:`t` ``step``; :math:`\gamma_d = \gamma`, or
    :math:`\gamma^2/\gamma_{\max}` with ``corrected_weight_decay``
    (:math:`\gamma_{\max}` the group's ``max_lr_snapshot``, the
    constructor's lr). Norms are per tensor (one trust
    ratio per param), except the global gradient norm of the clipping.

    Conventions: as timm, the trust ratio is applied only to groups with a
    non-zero ``weight_decay`` or ``always_adapt=True`` (exclude biases and
    norms from adaptation with a group of ``weight_decay=0``), and gradients
    are clipped by their global norm by default (``max_grad_norm=1.0``;
    ``None`` turns it off). Where we differ from timm, and why:

    - the clipping uses torch's ``clip_grad_norm_`` formula (the
      :math:`10^{-6}`, which timm's lacks: a relative difference of
      :math:`10^{-6}/\lVert g\rVert`), is per group like every
      ``max_grad_norm`` of ours (timm reads the defaults' only), leaves
      ``p.grad`` as it was (as timm 1.0.31's), and the norm of the step is
      readable as ``optimizer.grad_norm``;
    - step counts are per param, as torch.optim's Adam (timm counts per
      group, also for params that had no gradient);
    - ``caution=True`` groups are stepped unfused (see ``caution``): its
      mask is scaled by a per-tensor mean before the update's norm is
      taken, a second reduction the fused step does not make;
    - ``maximize`` is ours; ``foreach`` (timm's choice between its
      single-tensor and multi-tensor code) is accepted and kept in the
      groups, the step being the fused one either way; there is no
      ``fused`` or ``differentiable`` keyword (no torch.optim implementation
      to select).

    The moments are updated with timm 1.0.31's operations
    (``exp_avg.lerp_(grad, 1 - beta1)`` with grad averaging, else
    ``mul_(beta1).add_(grad)``; ``exp_avg_sq.mul_(beta2).addcmul_``), so in
    float32 and float64 they are timm's bit for bit, step after step,
    unless clipped (the factor above).

    The norms of every param (its float32 master copy with
    ``master_weights``) and of every update direction are computed in one
    measuring pass over all tensors of the step before the update pass (the
    gradients and moments are read twice, written once; sums in float64).
    The direction is computed in the compute type (float32 for fp16/bf16
    params) and never rounded to the param dtype. Sparse gradients are
    refused. On sharded DTensors (FSDP2, tensor parallelism) each rank
    measures its shards and the sums are all-reduced over the mesh before
    the update pass, so the norms are those of the whole tensors (Note
    [norms across shards]).

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        bias_correction (bool, optional): divide the moments by
            :math:`1-\beta^t` (default: True).
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` (default: 1e-6).
        weight_decay (float, optional): :math:`\lambda` (default: 0.01).
        grad_averaging (bool, optional): :math:`\beta_3 = 1-\beta_1`, else 1
            (default: True).
        max_grad_norm (float, optional): :math:`M`, clip the gradients by
            their global L2 norm; None: no clipping (default: 1.0).
        trust_clip (bool, optional): LAMBC, the ratio at most 1 (default: False).
        always_adapt (bool, optional): apply the ratio even with a zero
            weight decay (default: False).
        """ + _docs.CAUTION + r"""
        decoupled_decay (bool, optional): decay the param by
            :math:`\gamma\lambda` before its norm is taken, instead of adding
            :math:`\lambda\theta` to the update (default: False).
        corrected_weight_decay (bool, optional): with ``decoupled_decay``,
            decay by :math:`\gamma^2/\gamma_{\max}` instead of
            :math:`\gamma` (timm's; the constructor's lr, which must then be
            positive, is :math:`\gamma_{\max}`) (default: False).
        """
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.PRECISION
    + """
"""
    + _docs.FUSED_NOTE.format(op="lamb_")
    + """
    Note [LAMB's step in checkpoints]: ``state_dict()`` also puts each
    group's largest step count in the group as ``"step"`` (timm's layout), so
    timm's ``Lamb`` continues a checkpoint of ours; ``load_state_dict``
    accepts timm's (per-group steps) and takes each param's count from its
    group.

    References: You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel,
    Keutzer, Hsieh, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes", ICLR 2020, https://arxiv.org/abs/1904.00962; timm,
    https://github.com/huggingface/pytorch-image-models
    (timm/optim/lamb.py).
"""
)
