"""Where the microseconds of a small step go: one optimizer step of fused_optim
taken apart into its host-side pieces, each timed alone (medians of many
calls, warm), on the `tiny` workload (4 tensors of 1,024 elements) or any
other count and size.

    python benchmarks/step_breakdown.py [--optimizer adam] [--tensors 4] [--numel 1024] [--calls 3000]

The pieces nest: step() = the step wrapper + the step body; the body =
plan check (mostly the group options compared: fused_optim/_group_options.py)
+ the kept op call (fused_optim/_kept_calls.py: this step's tensors put into
the kept arguments, then the op: argument conversion, the gradients read,
checks, then the update).
Two more rows say what a step costs when a group option other than lr
changed since the last step (a momentum or beta schedule; lr is read every
step): the group arguments read again and the op call built by name. The last
three say what zero_grad() costs, ours against torch.optim's (whose
profiler span ours skips where no profiler records). Each row is timed alone, so the
pieces add up only roughly; the table says what a step costs and which part
to work on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim import Optimizer

import fused_optim
from fused_optim import _bucket, _ops
from fused_optim._journal import Journal
from fused_optim._ops import OpExtras

OPTIMIZERS = {
    "sgd": (fused_optim.SGD, torch.optim.SGD, {"momentum": 0.9}),
    "adagrad": (fused_optim.Adagrad, torch.optim.Adagrad, {}),
    "rmsprop": (fused_optim.RMSprop, torch.optim.RMSprop, {}),
    "adam": (fused_optim.Adam, torch.optim.Adam, {}),
    "adamw": (fused_optim.AdamW, torch.optim.AdamW, {}),
}


def median_us(fn, calls: int, rounds: int = 7) -> float:
    for _ in range(min(200, calls)):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def params(tensors: int, numel: int) -> list:
    ps = [torch.randn(numel, requires_grad=True) for _ in range(tensors)]
    for p in ps:
        p.grad = torch.randn(numel)
    return ps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about half a minute on a 2-core CPU machine.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--numel", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=3000, help="calls per timed round (7 rounds)")
    args = parser.parse_args(argv)
    ours_cls, torch_cls, kwargs = OPTIMIZERS[args.optimizer]
    ps = params(args.tensors, args.numel)
    opt = ours_cls(ps, lr=1e-3, **kwargs)
    for _ in range(3):
        opt.step()
    plan = opt._plan
    bucket = plan.buckets[0]
    kept = plan.kept_calls
    one_call = kept.calls[0]
    group_args = opt._group_arguments()
    extras = OpExtras(bucket.master_params(), None, None, False)
    grads = one_call.gradients(clipping=False, rebuild=False)  # (as the kept step hands them to the op)
    no_scalars = _bucket.StepScalars(None, None, None)  # (no AMP, no clipping)
    one_call._refresh(grads, no_scalars)  # (a step's arguments, copied: a step drops its own)
    call = one_call._call._replace(args=list(one_call._call.args))
    step_body = type(opt).step.__wrapped__
    gradients = [p.grad for p in ps]

    def set_grads():
        for p, grad in zip(ps, gradients):
            p.grad = grad
    rows = [
        ("step()", opt.step),
        ("  step body (no wrapper)", lambda: step_body(opt)),
        ("    plan check (_current_plan)", lambda: opt._current_plan(None)),
        ("      group options unchanged?", lambda: plan.options.unchanged(opt.param_groups)),
        ("    the kept call (KeptCalls.run)", lambda: kept.run(opt, plan.options, {"written": False})),
        ("      this step's tensors into the call", lambda: one_call._refresh(grads, no_scalars)),
        ("      the op (_C fast call)", lambda: _ops.call_fast(call)),
        ("        its conversion and checks alone", lambda: _ops.call_validate(call)),
        ("    journal", lambda: Journal(opt.state)),
        ("  an option other than lr changed: group arguments read", opt._group_arguments),
        ("  an option other than lr changed: op call built by name",
         lambda: opt._op_call(bucket, grads, group_args, extras)),
        # (last: each call sets the gradients again, then drops them)
        ("zero_grad(), the gradients set first", lambda: (set_grads(), opt.zero_grad())),
        ("  torch.optim's zero_grad instead", lambda: (set_grads(), Optimizer.zero_grad(opt))),
        ("  the gradients set alone", set_grads),
    ]
    peers = {}
    for impl, impl_kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True}),
                              ("for-loop", {"foreach": False})):
        try:
            peer = torch_cls(params(args.tensors, args.numel), lr=1e-3, **kwargs, **impl_kwargs)
            peer.step()
            peers[impl] = peer.step
        except (RuntimeError, TypeError, ValueError):
            pass
    print(f"{ours_cls.__name__}, {args.tensors} tensors of {args.numel} elements, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| piece | us |\n|---|---:|")
    for label, fn in rows:
        print(f"| {label} | {median_us(fn, args.calls):.1f} |")
    for impl, fn in peers.items():
        print(f"| torch.optim {torch_cls.__name__} {impl} step() | {median_us(fn, args.calls):.1f} |")


if __name__ == "__main__":
    main()
