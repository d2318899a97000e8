"""Building each implementation's optimizer (ours, torch.optim fused /
foreach / for-loop, DeepSpeedCPUAdam) and the step that is timed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Callable

import torch

from fused_optim.bench.specs import OURS, OptimizerSpec
from fused_optim.bench.workloads import ParamSet, Workload

# Why powers of two: dividing the gradients by them is exact, and alternating
# 2 and 1/2 keeps them where they started (never zero, never denormal) over
# any number of steps.
AMP_SCALES = (2.0, 0.5)


def param_groups(spec: OptimizerSpec, workload: Workload, param_set: ParamSet) -> list[dict]:
    groups = []
    for group_spec, params in zip(workload.groups, param_set.groups):
        group = {"params": params, "lr": spec.kwargs["lr"] * group_spec.lr_scale}
        if group_spec.weight_decay is not None:
            group["weight_decay"] = group_spec.weight_decay
        groups.append(group)
    return groups


def import_reference(module_name: str):
    """The module of a reference implementation: imported, or, when its
    package is installed but importing the package fails (timm's imports
    torchvision, which the optimizer files do not need), that file loaded
    without its package's __init__: as a submodule of a stand-in package
    whose path is the file's folder, so that its relative imports of
    sibling files work (timm's lamb.py: ``from ._types import ParamsT``).
    Raises ImportError when neither works."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        top, *rest = module_name.split(".")
        spec = importlib.util.find_spec(top)
        if not rest or spec is None or not spec.submodule_search_locations:
            raise
        folder = os.path.join(list(spec.submodule_search_locations)[0], *rest[:-1])
        path = os.path.join(folder, rest[-1] + ".py")
        if not os.path.isfile(path):
            raise
        package_name = "_reference_" + "_".join([top, *rest[:-1]])
        if package_name not in sys.modules:
            package = types.ModuleType(package_name)
            package.__path__ = [folder]
            sys.modules[package_name] = package
        name = f"{package_name}.{rest[-1]}"
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as error:  # (a file that needs more of its package)
            del sys.modules[name]
            raise ImportError(f"{path}: {error}") from error
        return module


def optimizer_class(impl: str, spec: OptimizerSpec, ours_module) -> tuple[type, dict]:
    """The class to build for `impl`, and its implementation-selecting kwargs."""
    if impl == OURS:
        return getattr(ours_module, spec.class_name), {}
    if impl == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {"adamw_mode": spec.class_name == "AdamW"}
    if impl == "reference":
        module, name = spec.reference.split(":")
        return getattr(import_reference(module), name), {}
    cls = getattr(torch.optim, spec.class_name)
    if impl == "torch-fused":
        return cls, {"fused": True}
    if impl == "torch-foreach":
        return cls, {"foreach": True}
    extra = {"foreach": False}
    if spec.torch_has_fused:
        extra["fused"] = False
    return cls, extra


def implementation_and_kwargs(impl, spec, ours_module, precision) -> tuple[type, dict]:
    """The class to build for `impl` and every keyword it is built with."""
    cls, impl_kwargs = optimizer_class(impl, spec, ours_module)
    if impl == OURS:
        impl_kwargs = {**impl_kwargs, **precision.ours_kwargs()}
        if precision.amp and spec.torch_has_fused:
            # Unscaled in the step, as the user asks for it: fused=True
            # (Note [who unscales under GradScaler]); the other classes get
            # GradScaler's own pass unless master weights are on.
            impl_kwargs["fused"] = True
    return cls, {**spec.kwargs, **impl_kwargs}


def make_optimizer(
    impl, spec, workload, param_set, ours_module, precision
) -> torch.optim.Optimizer:
    cls, kwargs = implementation_and_kwargs(impl, spec, ours_module, precision)
    return cls(param_groups(spec, workload, param_set), **kwargs)


def why_ours_cannot_run(spec, precision, ours_module, device) -> str | None:
    """Why ours cannot be built for this optimizer and precision (e.g.
    timm's cautious variants, unfused, take no precision option), or None:
    asked of the constructor itself, on a one-element param, before any
    timing."""
    try:
        cls, kwargs = implementation_and_kwargs(OURS, spec, ours_module, precision)
        cls([torch.zeros(1, dtype=precision.param_dtype, device=device)], **kwargs)
    except Exception as error:  # (what its constructor refuses, as the run would meet it)
        return f"{type(error).__name__}: {error}"
    return None


def amp_step(optimizer, param_set: ParamSet) -> Callable[[], object]:
    """One AMP step as torch.amp.GradScaler.step makes it for this optimizer.

    Optimizers whose step unscales (``_step_supports_amp_scaling``: ours and
    torch's fused ones) get GradScaler's ``grad_scale``/``found_inf``
    attributes; the others get GradScaler's separate unscale pass
    (``torch._amp_foreach_non_finite_check_and_unscale_``, in place) before
    the step. GradScaler's own inf check and its bookkeeping are not timed.
    The scale alternates between AMP_SCALES.
    """
    device = param_set.params[0].device
    found_inf = torch.zeros((), device=device)
    scales = [torch.full((), s, device=device) for s in AMP_SCALES]
    inverse_scales = [torch.full((), 1.0 / s, device=device) for s in AMP_SCALES]
    calls = [0]
    param_set.grads_written = True
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = found_inf

        def step():
            optimizer.grad_scale = scales[calls[0] % 2]
            calls[0] += 1
            return optimizer.step()

        step.amp_path = "unscaled in the step"
    else:
        grads = param_set.grads

        def step():
            inverse = inverse_scales[calls[0] % 2]
            calls[0] += 1
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
            return optimizer.step()

        step.amp_path = "GradScaler's unscale pass, then the step"
    return step


def clipped_step(optimizer, param_set: ParamSet) -> Callable[[], object]:
    """A peer's clipped step: torch.nn.utils.clip_grad_norm_ (foreach: one
    norm pass, one in-place scaling pass), then the step. Ours clips inside
    its step (max_grad_norm, in ``ours_kwargs``)."""
    from fused_optim.bench.specs import CLIP_NORM

    params = param_set.params
    param_set.grads_written = True

    def step():
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM, foreach=True)
        return optimizer.step()

    step.amp_path = "clip_grad_norm_, then the step"
    return step


class TorchFusedAsOurs:
    """Stand-in for fused_optim while it does not import (--ours torch-fused)."""

    def __getattr__(self, class_name):
        cls = getattr(torch.optim, class_name)
        fast = {"foreach": True} if class_name == "RMSprop" else {"fused": True}
        return lambda params, **kwargs: cls(params, **fast, **kwargs)


def load_ours(which: str):
    if which == "torch-fused":
        return TorchFusedAsOurs()
    return importlib.import_module("fused_optim")


def deepspeed_available() -> bool:
    try:
        importlib.import_module("deepspeed.ops.adam")
        return True
    except Exception:  # ImportError, or a broken install raising anything else
        return False


def impls_for(spec, device, precision, requested, notes) -> list[str]:
    """The implementations to time for one optimizer, with notes on those left out."""
    impls = []
    in_torch = hasattr(torch.optim, spec.class_name)
    for impl in requested:
        reason = None
        if impl.startswith("torch-") and not in_torch:
            reason = f"torch.optim has no {spec.class_name}: its peer is its reference implementation"
        elif impl == "reference":
            if spec.reference is None:
                continue  # torch.optim's are the peers: no note
            try:
                import_reference(spec.reference.split(":")[0])
            except ImportError:
                reason = f"{spec.reference.split(':')[0]} not importable: {spec.class_name}'s reference skipped"
        elif impl == "torch-fused" and not spec.torch_has_fused:
            reason = f"torch.optim.{spec.class_name} has no fused=True"
        elif impl == "deepspeed":
            if device != "cpu" or spec.class_name not in ("Adam", "AdamW"):
                continue  # not a peer here: no note
            if not deepspeed_available():
                reason = "deepspeed not importable: DeepSpeedCPUAdam skipped"
            elif precision.name != "fp32":
                reason = "DeepSpeedCPUAdam timed for fp32 only"
        if reason is None:
            impls.append(impl)
        elif reason not in notes:
            notes.append(reason)
    return impls
