"""The step as a training loop pays it: right after backward.

The main benchmark (``python -m fused_optim.bench``) steps on gradients set
once, so every gradient tensor has had a Python object since the start. In
a training loop, ``zero_grad()`` (set_to_none) drops the gradients and
backward makes new ones in C++, with no Python object until Python reads
``p.grad``; the step also runs just after backward has walked the autograd
graph, with the optimizer's metadata out of cache. This script times
``step()`` in that position, on the tensors of `many-small` (2,000
tensors of 256 to 4,096 elements) or any count and size:

* ``ours``: fused_optim's step, the gradients read by the op in C++ (Note
  [gradients read in C++] in csrc/python_module.cpp);
* ``ours, grads in Python``: the same step with the gradients gathered as
  a Python list first (``_C.grads_of``), as the step read them before that
  note: the A/B of that change;
* torch.optim's ``fused=True``, ``foreach=True`` and for-loop steps.

Each round runs one backward and one timed step per implementation, in a
rotated order, all in one process (interleaved, as the benchmarking doc
asks); medians over the rounds.

    python benchmarks/step_after_backward.py [--optimizer sgd] [--rounds 60]
        [--tensors 2000 --numel 1385]   (default: many-small's sizes)
"""

from __future__ import annotations

import argparse
import time

import torch

import fused_optim
from fused_optim import _bucket, _kept_calls
from fused_optim.bench.workloads import many_small_sizes
from interleaved import OPTIMIZERS, interleaved_times, print_medians

def gradients_in_python(call, clipping: bool, rebuild: bool):
    """OneCall.gradients as it was before Note [gradients read in C++]:
    every gradient handed to the op in a Python list."""
    grads, complete, dense = _bucket.gather_grads(call.bucket.params)
    return grads if complete and dense else None


class Implementation:
    """One optimizer over its own params, and the loss whose backward
    makes their gradients (one sum per tensor: backward then writes every
    gradient in C++, as a model's backward does)."""

    def __init__(self, name, optimizer_class, kwargs, sizes, gradients=None):
        self.name = name
        torch.manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        self.optimizer = optimizer_class(self.params, **kwargs)
        self.gradients = gradients  # (ours: OneCall.gradients to use)

    def backward(self) -> None:
        self.optimizer.zero_grad()
        torch.autograd.backward([p.sum() for p in self.params])

    def backward_then_step(self) -> float:
        """One round: the backward, then the step; the step's seconds."""
        self.backward()
        return self.timed_step()

    def timed_step(self) -> float:
        if self.gradients is not None:
            _kept_calls.OneCall.gradients = self.gradients
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about a minute on a 2-core CPU machine.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tensors", type=int, help="tensor count (default: many-small's)")
    parser.add_argument("--numel", type=int, default=1385, help="elements per tensor, with --tensors")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or (args.tensors is not None and args.tensors < 1):
        parser.error("--rounds and --tensors must be at least 1, --warmup at least 0")
    class_name, kwargs = OPTIMIZERS[args.optimizer]
    ours_class, torch_class = getattr(fused_optim, class_name), getattr(torch.optim, class_name)
    sizes = many_small_sizes() if args.tensors is None else [args.numel] * args.tensors
    in_cpp = _kept_calls.OneCall.gradients
    impls = [
        Implementation("ours", ours_class, kwargs, sizes, in_cpp),
        Implementation("ours, grads in Python", ours_class, kwargs, sizes, gradients_in_python),
    ]
    for label, extra in (("torch fused", {"fused": True}), ("torch foreach", {"foreach": True}),
                         ("torch for-loop", {"foreach": False})):
        impls.append(Implementation(label, torch_class, {**kwargs, **extra}, sizes))
    try:
        times = interleaved_times({impl.name: impl.backward_then_step for impl in impls},
                                  args.rounds, args.warmup)
    finally:
        _kept_calls.OneCall.gradients = in_cpp
    print(f"{ours_class.__name__}({kwargs}), {len(sizes)} tensors, {sum(sizes):,} elements, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print_medians(times, "ours", "step after backward")


if __name__ == "__main__":
    main()
