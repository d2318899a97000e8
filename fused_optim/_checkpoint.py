"""Checkpoints (a mixin of FusedOptimizer): ``state_dict`` and
``load_state_dict`` in torch.optim's layout, with the loaded layout checked
before anything changes and the state brought to our precision options
after."""

from __future__ import annotations

import contextlib
import numbers
from collections import OrderedDict

import torch
from torch.nn.parameter import is_lazy

from fused_optim._clip import check_max_grad_norm
from fused_optim._planning import _CPU, counter_for_op, step_device
from fused_optim._precision import PRECISION_DEFAULTS, precision_of

# Note [implementation keywords on load]
# torch.optim's load_state_dict replaces a group's options with the saved
# ones, implementation keywords included, so a checkpoint of
# torch.optim.AdamW(fused=False) (build-nanogpt on CPU writes such) would
# quietly put a fused_optim optimizer on torch's unfused path. How this
# optimizer runs is its own choice, not training state: loading keeps its
# foreach, fused, capturable and differentiable (strictly better; the
# hyperparameters are loaded as torch loads them), and so its precision
# options (Note [our options in param groups]).
_IMPLEMENTATION_KEYWORDS = ("foreach", "fused", "capturable", "differentiable")


class Checkpoints:
    """torch.optim's checkpoint methods, kept interchangeable with it."""

    def state_dict(self):
        """torch.optim's ``state_dict``, in torch.optim's layout: the param
        groups hold the live groups' keys, as torch's do: torch.optim's keys
        unless an option of ours is set (Note [our options in param
        groups]; ``state_dtype`` saved by name, "torch.bfloat16"). Our
        extra state (``master_param``) stays in ``state``.
        Hooks run as in torch.optim; post-hooks see the final dict."""
        with _hooks_set_aside(self, "_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            # (by name: torch's state-dict tools, full_state_dict and
            # cpu_offload, take no dtype object; the loader keeps its own)
            if isinstance(group.get("state_dtype"), torch.dtype):
                group["state_dtype"] = str(group["state_dtype"])
        self._export_state_dict(state_dict)
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict):
        """torch.optim's ``load_state_dict`` (pre-hooks, then the load, then
        post-hooks), with the loaded layout checked before anything changes
        (Note [validate before mutating]) and the state brought to this
        optimizer's precision options afterwards. Param groups keep their
        precision options and implementation keywords whatever the
        checkpoint says, and their ``max_grad_norm`` unless the checkpoint
        has one (a torch.optim checkpoint has none): Note [our options in
        param groups]."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)  # (before a class's import reads it)
        state_dict = self._import_state_dict(state_dict)
        # Kept whatever the checkpoint says (an older one of ours has the
        # precision options): the loader's configuration.
        kept = [{k: g[k] for k in (*_IMPLEMENTATION_KEYWORDS, *PRECISION_DEFAULTS) if k in g}
                for g in self.param_groups]
        clipping = [{"max_grad_norm": g["max_grad_norm"]} if "max_grad_norm" in g else {}
                    for g in self.param_groups]
        with _hooks_set_aside(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ) as (_, post_hooks):
            super().load_state_dict(state_dict)
        for group, saved, own, own_clipping in zip(
            self.param_groups, state_dict["param_groups"], kept, clipping
        ):
            # Note [implementation keywords on load], Note [our options in
            # param groups]
            for key in PRECISION_DEFAULTS:
                group.pop(key, None)
            group.update(own)
            if "max_grad_norm" not in saved:
                group.update(own_clipping)
        self._plan = None
        self._normalize_state(state_dict)
        # Note [a loaded master copy]
        self._unchecked_masters = {param for param, state in self.state.items()
                                if isinstance(state, dict) and "master_param" in state}
        for hook in post_hooks.values():
            hook(self)

    def _export_state_dict(self, state_dict) -> None:
        """A class's additions to its saved dict, in place, before the
        post-hooks (Lamb: timm's per-group ``step``). None by default."""

    def _import_state_dict(self, state_dict):
        """A loaded dict in this class's layout (Lamb: timm's per-group
        ``step`` made per-param), after the pre-hooks; a new dict, the
        caller's left as it was. As it is by default."""
        return state_dict

    def _check_state_dict(self, state_dict) -> None:
        """Rejects a state dict whose layout does not fit, before anything is
        loaded (torch checks group counts and sizes only)."""
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group "
                    "that doesn't match the size of optimizer's group"
                )
        for saved in saved_groups:
            # (loaded as a hyperparameter: refused as the constructor
            # refuses it, not at the next step)
            if "max_grad_norm" in saved:
                try:
                    check_max_grad_norm(saved["max_grad_norm"])
                except ValueError as error:
                    raise ValueError(f"loaded state dict: {error}") from None
        id_to_param = {}
        for group, saved in zip(groups, saved_groups):
            # (the state names of the mode the loaded options select)
            names = self._state_names(self._mode({**group, **saved}))
            id_to_param.update(
                (key, (param, names)) for key, param in zip(saved["params"], group["params"]))
        for key, param_state in state_dict["state"].items():
            param, names = id_to_param.get(key, (None, ()))
            if param is None or not isinstance(param_state, dict):
                continue  # (kept as loaded, as torch keeps them)
            for name, value in param_state.items():
                _check_state_value_type(name, value, names, self._scalar_state_names)
                if not isinstance(value, torch.Tensor):
                    continue
                if name in ("step", *self._scalar_state_names):
                    if value.numel() != 1:
                        raise ValueError(f"loaded state dict has state {name!r} of "
                                         f"{value.numel()} elements for a param: expected one")
                    continue
                if not is_lazy(param) and value.shape != param.shape:
                    # (a lazy module's param before its dry run has no shape
                    # yet; torch loads into it, and the op checks the shapes
                    # once it has one)
                    raise ValueError(
                        f"loaded state dict has state {name!r} of shape "
                        f"{tuple(value.shape)} for a param of shape {tuple(param.shape)}"
                    )

    def _normalize_state(self, state_dict) -> None:
        """After loading: torch.optim's load casts every state tensor to its
        param's dtype, which would round a float32 master copy or float32
        moments of bf16 params to bf16. Those are taken again from the
        loaded dict, at full precision. Step counters become tensors the op
        reads (``counter_for_op``), on the device it reads them on: the CPU
        for CPU params, the param's device otherwise (torch keeps them there
        for its fused and capturable paths only); in a group that
        torch.optim's code steps, where torch's load puts them."""
        saved = {}
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for param, key in zip(group["params"], saved_group["params"]):
                if key in state_dict["state"]:
                    saved[param] = (group, state_dict["state"][key])
        for param, state in self.state.items():
            if not isinstance(param, torch.Tensor) or not isinstance(state, dict):
                continue  # torch allows other entries (flags of hooks): kept as loaded
            group, source = saved.get(param, (None, {}))
            if group is not None and param.is_floating_point():
                precision = precision_of(group, param.dtype)
                for key, value in source.items():
                    loaded = state.get(key)
                    if key == "step" or not isinstance(loaded, torch.Tensor):
                        continue
                    if not isinstance(value, torch.Tensor):
                        value = loaded  # (a number, which torch's load made a tensor)
                    if key in self._scalar_state_names:
                        # Per-param scalar state (NAdam's mu_product): as
                        # torch's load, in the param's dtype for float64
                        # params, else float32 (torch's would be fp16/bf16
                        # for such params: a lossy product), where the op
                        # reads it; the loaded tensor itself where that is
                        # its dtype and device, as torch keeps it.
                        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
                        if value.is_floating_point():
                            state[key] = value.to(device=step_device(param), dtype=dtype)
                        continue
                    dtype = torch.float32 if key == "master_param" else precision.state_dtype
                    if loaded.dtype != dtype and value.is_floating_point():
                        state[key] = value.to(device=loaded.device, dtype=dtype, copy=True)
            step = state.get("step")
            if step is None:
                continue
            if group is not None and self._unfused(group):
                # torch.optim's code steps the group: its counters stay
                # where torch's load puts them, on the CPU unless capturable
                # (that code reads them with .item(): no sync with a GPU,
                # and meta refuses it), a number made a counter there as
                # torch's __setstate__ makes it
                if not isinstance(step, torch.Tensor):
                    state["step"] = counter_for_op(
                        step, param.device if group.get("capturable") else _CPU)
            else:
                state["step"] = counter_for_op(step, step_device(param))


def _check_state_value_type(name: str, value, names: tuple, scalar_names: tuple) -> None:
    """A counter must be a tensor or a number, and a state tensor of the
    mode (or the master copy) a tensor, or None (torch 1.x's SGD): torch's
    load would fail on anything else only after changing the state (DCP's
    flattened loader, for instance, makes ``{}`` of a param's missing
    keys). Other keys are kept as loaded, as torch keeps them."""
    if name in ("step", *scalar_names):
        if isinstance(value, torch.Tensor) or (
                isinstance(value, numbers.Real) and not isinstance(value, bool)):
            return
        expected = "a tensor or a number"
    elif name in (*names, "master_param"):
        if value is None or isinstance(value, torch.Tensor):
            return
        expected = "a tensor"
    else:
        return
    raise TypeError(f"loaded state dict has state {name!r} of type {type(value).__name__} "
                    f"for a param: expected {expected}")


@contextlib.contextmanager
def _hooks_set_aside(optimizer, *names: str):
    """Empties the named hook dicts of ``optimizer`` for the duration and
    yields their contents, so that the caller runs them itself at the point
    where torch.optim would (around our additions to its method)."""
    saved = tuple(getattr(optimizer, name) for name in names)
    for name in names:
        setattr(optimizer, name, OrderedDict())
    try:
        yield saved
    finally:
        for name, hooks in zip(names, saved):
            setattr(optimizer, name, hooks)
