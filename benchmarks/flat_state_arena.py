"""Should the optimizer state live in one flat buffer (a "state arena")?

The measurement behind Note [state arena] (fused_optim/_arena.py). The
arena keeps torch's layout visible: each ``state[p]["exp_avg"]`` is still a
tensor of ``p``'s shape, but a view of one buffer per state name and dtype,
so the step walks the state in memory order. This script compares the state
as the step makes it (packed) with the same values in their own tensors
(each state tensor cloned: torch.optim's layout, and ours before the arena)
and measures both sides of the trade:

* ``step``: medians of the step on `many-small` (the workload's 2,000
  tensors of 256 to 4,096 elements), ours packed, ours with own tensors,
  and torch's ``fused=True``, interleaved in one process;
* ``compile``: the time of ``torch.compile(opt.step)`` and three steps,
  with and without packing, on ``--compile-params`` tensors. Views of one
  buffer that the step mutates are aliased graph inputs for torch.compile,
  which then reasons about each pair of them (a compiled step makes its
  state unpacked; this is the cost for state packed by an eager step).

    python benchmarks/flat_state_arena.py [--optimizer sgd] [--rounds 25]
        [--compile-params 200] [--no-compile]

Run the compile part with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, so that a
graph cached by an earlier run does not hide the compile time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused_optim
from fused_optim.bench.workloads import many_small_sizes

OPTIMIZERS = {
    "sgd": (fused_optim.SGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adam": (fused_optim.Adam, torch.optim.Adam, {"lr": 1e-3}),
}


def params_with_grads(sizes: list) -> list:
    params = [torch.randn(n) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel())
    return params


def unpack_state(optimizer) -> None:
    """Gives each dense state tensor its own memory (a clone: same values,
    shape and strides), as torch.optim lays state out."""
    for state in optimizer.state.values():
        for name, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[name] = value.clone()


def time_steps(optimizer_name: str, rounds: int) -> dict:
    ours_cls, torch_cls, kwargs = OPTIMIZERS[optimizer_name]
    sizes = many_small_sizes()
    variants = {
        "torch fused": torch_cls(params_with_grads(sizes), fused=True, **kwargs),
        "ours, state packed": ours_cls(params_with_grads(sizes), **kwargs),
        "ours, own state tensors": ours_cls(params_with_grads(sizes), **kwargs),
    }
    for name, optimizer in variants.items():
        optimizer.step()
        if name == "ours, own state tensors":
            unpack_state(optimizer)
        optimizer.step()
    samples = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        # (each round in another order: no variant always follows the same one)
        for name in names[r % len(names):] + names[:r % len(names)]:
            optimizer = variants[name]
            start = time.perf_counter()
            for _ in range(5):
                optimizer.step()
            samples[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_compile(optimizer_name: str, count: int, packed: bool) -> float:
    ours_cls, _, kwargs = OPTIMIZERS[optimizer_name]
    torch._dynamo.reset()
    params = params_with_grads([100 + i for i in range(count)])
    optimizer = ours_cls(params, **kwargs)
    optimizer.step()  # (eager: the state is packed)
    if not packed:
        unpack_state(optimizer)
    step = torch.compile(optimizer.step)
    start = time.perf_counter()
    for _ in range(3):
        step()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about half a minute on a 2-core CPU machine.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--compile-params", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    medians = time_steps(args.optimizer, args.rounds)
    print(f"{args.optimizer}, many-small, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds of 5 steps interleaved")
    print("| step | ms (median) | torch fused / this |\n|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3f} | {medians['torch fused'] / ms:.2f}x |")
    if args.no_compile:
        return
    print(f"\ntorch.compile(step) and 3 steps, {args.compile_params} params")
    print("| state | s |\n|---|---:|")
    for packed in (False, True):
        seconds = time_compile(args.optimizer, args.compile_params, packed)
        print(f"| {'packed' if packed else 'own tensors'} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
