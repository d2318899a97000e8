"""A faster batched forward for the common case: a ``nn.Sequential`` of
``Linear`` layers and elementwise modules, computed on the stacked params
with plain batched ops (``baddbmm``) instead of ``vmap``.

Why: on small models vmap's per-op dispatch and its batching rule for
``linear`` (a ``bmm`` plus a separate bias ``add``) cost about as much as
the arithmetic. For the 64-64-64-10 MLP at K = 64 on 2 CPU cores the step
takes about 40% less this way (measured while writing this; the benchmark
in ``fused_optim.sweep.bench`` has the numbers). Each configuration's slice
of a ``bmm`` is computed as if it were alone, so dropping configurations
leaves the others bit for bit as they were (tested), as with vmap.

Anything else (convolutions, BatchNorm, attention, custom modules) runs
through vmap: ``plan`` returns None for it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Modules that act on each element (or each sample) alone and hold no
# params, so they apply to the stacked activations (K, B, ...) unchanged.
# Dropout draws one mask for all K slices: different per configuration.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Identity, nn.Dropout,
)

Layer = Callable[[torch.Tensor, dict], torch.Tensor]


def plan(template: nn.Module) -> list[Layer] | None:
    """The layers of ``template`` as functions of (stacked activations
    (K, B, ...), stacked params by name), or None when it is not made only
    of what this file handles."""
    layers: list[Layer] = []
    after_linear = []  # whether the last layer appended is a Linear

    def visit(module: nn.Module, prefix: str) -> bool:
        if type(module) is nn.Sequential:
            return all(visit(child, f"{prefix}{name}.") for name, child in module.named_children())
        linear_before = bool(after_linear) and after_linear[-1]
        after_linear.append(type(module) is nn.Linear)
        if type(module) is nn.Linear:
            layers.append(_linear(prefix, module.bias is not None))
            return True
        if type(module) is nn.ReLU and linear_before:
            # In place on the fresh (baddbmm) output, which no backward
            # needs: 5-10% of an MLP step at K = 16-64 (one tensor of
            # K x batch x width not written and read again).
            layers.append(lambda h, params: torch.relu_(h))
            return True
        if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
            layers.append(lambda h, params: h.flatten(2))
            return True
        if type(module) in ELEMENTWISE and not any(True for _ in module.parameters()):
            layers.append(lambda h, params, module=module: module(h))
            return True
        return False

    if any(True for _ in template.buffers()) or not visit(template, ""):
        return None
    return layers


def _linear(prefix: str, has_bias: bool) -> Layer:
    weight_name, bias_name = prefix + "weight", prefix + "bias"

    def linear(h: torch.Tensor, params: dict) -> torch.Tensor:
        weight = params[weight_name].transpose(1, 2)  # (K, in, out)
        shape = h.shape
        flat = h if h.dim() == 3 else h.reshape(shape[0], -1, shape[-1])  # (K, B * ..., in)
        if has_bias:
            out = torch.baddbmm(params[bias_name].unsqueeze(1), flat, weight)
        else:
            out = torch.bmm(flat, weight)
        # (no view when none is needed: an in-place ReLU on a view would
        # make autograd copy the whole base back in its backward)
        return out if h.dim() == 3 else out.view(*shape[:-1], out.shape[-1])

    return linear


def forward(layers: list[Layer], params: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """The K outputs (K, B, ...) for one shared input batch ``x`` (B, ...)."""
    h = x.unsqueeze(0).expand(k, *x.shape)
    for layer in layers:
        h = layer(h, params)
    return h


def batched_loss(loss_fn) -> Callable | None:
    """``losses(outputs (K, B, C), targets (B,)) -> (K,)`` computed without
    vmap, for the loss functions it knows (``F.cross_entropy`` with its
    defaults: the mean over the targets that are not ``ignore_index``);
    None otherwise (the caller vmaps ``loss_fn``)."""
    if loss_fn is not F.cross_entropy:
        return None

    def cross_entropy(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 3 or target.dim() != 1 or target.is_floating_point():
            return torch.vmap(F.cross_entropy, in_dims=(0, None))(outputs, target)
        # -log softmax(x)[y] = logsumexp(x) - x[y]: the same value as
        # F.cross_entropy (within rounding), and for 10 classes half its
        # cost (log_softmax writes and reads back all K x batch x classes).
        k, b = outputs.shape[:2]
        counted = target != -100  # (F.cross_entropy's ignore_index)
        index = torch.where(counted, target, 0).expand(k, b).unsqueeze(-1)
        each = torch.logsumexp(outputs, -1) - outputs.gather(-1, index).squeeze(-1)
        return each.masked_fill(~counted, 0).sum(1) / counted.sum()

    return cross_entropy
