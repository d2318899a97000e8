"""The workloads (shapes only), the blocks timed side by side, and the
parameter tensors each implementation steps on."""

from __future__ import annotations

import dataclasses
import math

import torch

from fused_optim.bench.specs import (
    OPTIMIZERS,
    OURS,
    PRECISIONS,
    OptimizerSpec,
    Precision,
    bytes_per_element,
)

# --------------------------------------------------------------------------
# Workloads: shapes only; tensors are made per implementation
# --------------------------------------------------------------------------


@dataclasses.dataclass
class GroupSpec:
    shapes: list[tuple[int, ...]]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's own default


@dataclasses.dataclass
class Workload:
    name: str
    groups: list[GroupSpec]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for g in self.groups for s in g.shapes)

    @property
    def num_tensors(self) -> int:
        return sum(len(g.shapes) for g in self.groups)


def large_workload(device: str, scale: float) -> Workload:
    """~50M params (CPU) or ~1B (CUDA) in 200 tensors of varied sizes."""
    total = (50e6 if device == "cpu" else 1e9) * scale
    count = 200
    rng = torch.Generator().manual_seed(0)
    # Sizes spread over [0.5, 1.5] x mean, multiples of 16: no two alike.
    factors = 0.5 + torch.rand(count, generator=rng)
    sizes = (factors / factors.sum() * total / 16).round().clamp(min=1) * 16
    return Workload("large", [GroupSpec([(int(n),) for n in sizes])])


def many_small_workload(device: str, scale: float) -> Workload:
    """~2000 tensors of 256 to 4096 elements (LayerNorm/bias-heavy models)."""
    count = max(1, round(2000 * scale))
    rng = torch.Generator().manual_seed(1)
    log_sizes = torch.empty(count).uniform_(math.log(256), math.log(4096), generator=rng)
    return Workload("many-small", [GroupSpec([(int(n),) for n in log_sizes.exp()])])


def many_small_sizes() -> list:
    """The element counts of `many-small`'s tensors (the stand-alone
    scripts in benchmarks/ step the same tensors)."""
    (group,) = many_small_workload("cpu", 1.0).groups
    return [n for (n,) in group.shapes]


def many_groups_workload(device: str, scale: float) -> Workload:
    """A GPT-like model in 26 param groups with layer-wise LR decay.

    Each of the 12 layers has a decay group (matrices) and a no-decay group
    (biases, LayerNorm); the embeddings and the final LayerNorm have their own.
    LR of layer i is lr * 0.9 ** (13 - i), embeddings 0.9 ** 13.
    """
    layers, lr_decay, weight_decay = 12, 0.9, 1e-2
    d0, vocab0, ctx = (256, 8192, 512) if device == "cpu" else (1024, 50304, 2048)
    # Both sides of the matrices grow with sqrt(scale): elements grow with scale.
    d = max(64, round(d0 * math.sqrt(scale) / 64) * 64)
    vocab = max(64, round(vocab0 * math.sqrt(scale)))
    groups = [GroupSpec([(vocab, d), (ctx, d)], lr_decay ** (layers + 1), 0.0)]
    for i in range(1, layers + 1):
        lr_scale = lr_decay ** (layers + 1 - i)
        matrices = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
        vectors = [(d,), (d,), (3 * d,), (d,), (d,), (d,), (4 * d,), (d,)]
        groups.append(GroupSpec(matrices, lr_scale, weight_decay))
        groups.append(GroupSpec(vectors, lr_scale, 0.0))
    groups.append(GroupSpec([(d,), (d,)], 1.0, 0.0))
    return Workload("many-groups", groups)


def tiny_workload(device: str, scale: float) -> Workload:
    """4 tensors of 1,024 elements: the fixed cost of a step (small models, RL loops, lockstep search)."""
    size = max(1, round(1024 * scale))
    return Workload("tiny", [GroupSpec([(size,)] * 4)])


WORKLOADS = {
    "large": large_workload,
    "many-small": many_small_workload,
    "many-groups": many_groups_workload,
    "tiny": tiny_workload,
}


def describe_workload(name: str) -> str:
    """The first line of the workload's docstring (for --help)."""
    return WORKLOADS[name].__doc__.strip().splitlines()[0].rstrip(".")


@dataclasses.dataclass
class Block:
    """One optimizer on one workload in one precision: the unit timed side by side."""

    optimizer: str
    workload: Workload
    precision_name: str

    @property
    def spec(self) -> OptimizerSpec:
        return OPTIMIZERS[self.optimizer]

    @property
    def precision(self) -> Precision:
        return PRECISIONS[self.precision_name]

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.param_dtype

    @property
    def label(self) -> str:
        return f"{self.optimizer} {self.workload.name} {self.precision_name}"

    def precision_of(self, impl: str) -> Precision:
        """The precision `impl` runs: ours as asked, the peers torch.optim's."""
        return self.precision if impl == OURS else self.precision.torch_equivalent()


def bytes_per_step(spec: OptimizerSpec, workload: Workload, precision: Precision) -> float:
    return workload.numel * bytes_per_element(spec, precision)


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def fill_random(tensors: list[torch.Tensor], seed: int) -> None:
    """Same seed, same values, on any device: uniform in [-1, 1), never zeros."""
    generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
    for t in tensors:
        t.uniform_(-1.0, 1.0, generator=generator)


class ParamSet:
    """One copy of a workload's params, with grads set once and kept."""

    def __init__(self, workload: Workload, dtype: torch.dtype, device: str, seed: int):
        self.seed = seed
        self.groups = [
            [torch.empty(s, dtype=dtype, device=device) for s in g.shapes]
            for g in workload.groups
        ]
        self.params = [p for group in self.groups for p in group]
        self.grads = [torch.empty_like(p) for p in self.params]
        fill_random(self.grads, seed + 1)
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        self.grads_written = False  # an AMP step unscaled the grads in place

    def reset(self) -> None:
        """Back to the initial values, so that every block starts the same."""
        fill_random(self.params, self.seed)
        if self.grads_written:
            fill_random(self.grads, self.seed + 1)
            self.grads_written = False


class ParamPool:
    """ParamSets of one workload and dtype, made on first use, kept across optimizers.

    Set k of every implementation has the same values (same seed).
    """

    def __init__(self, workload: Workload, dtype: torch.dtype, device: str):
        self.workload, self.dtype, self.device = workload, dtype, device
        self.sets: dict[tuple[str, int], ParamSet] = {}

    def get(self, impl: str, k: int) -> ParamSet:
        if (impl, k) not in self.sets:
            self.sets[(impl, k)] = ParamSet(self.workload, self.dtype, self.device, seed=1000 * k)
        param_set = self.sets[(impl, k)]
        param_set.reset()
        return param_set
