"""Kernel-only step time of fused_optim on CUDA, against a device-to-device copy.

For each optimizer (fp32 params and state, the hyperparameters of
``python -m fused_optim.bench``) and each layout COUNTxNUMEL (COUNT tensors of
NUMEL elements each), three times per implementation:

  graph  the step captured in a CUDA graph and replayed, between two CUDA
         events: the GPU time of the kernels alone (what the step costs
         inside a captured training step)
  eager  optimizer.step() between two CUDA events, started from an idle
         stream: the GPU time including any gaps while the host enqueues
  host   the host's time to enqueue one eager step (no sync)

for fused_optim and for torch.optim's fastest capturable peer: fused=True
(with capturable=True where torch takes it), else foreach=True (Lion, Lars
and Lamb, which torch.optim lacks, have no peer here). Medians of
--repeats calls. A time is also shown as a fraction of the device's copy
bandwidth: the bytes an ideal single pass moves (fp32: 28 per element for
Adam, AdamW, RAdam, NAdam and Lamb; 20 for SGD with momentum, Adagrad,
RMSprop, Lion and Lars; the byte budgets of ``python -m fused_optim.bench``,
which for Lars and Lamb leave out their norms' passes), divided by the
time, over the bandwidth of a 1 GiB device-to-device copy (read + write
counted). 100% is the memory-bound limit.

    python benchmarks/gpu_kernel_timing.py [--optimizers adam,sgd]
        [--layouts 200x5000000,1x1000000000] [--repeats 15] [--json PATH]

Run from the repository root after an in-place CUDA build (the checkout's
fused_optim is imported; csrc/cuda/README.md). Needs a GPU and fused_optim
built with CUDA, and refuses to run otherwise. Results are printed as they
come and, with --json, the file is rewritten after each one, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time

# The checkout's fused_optim (this file is in <root>/benchmarks).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

try:
    from fused_optim.bench.specs import ALL_OPTIMIZERS, OPTIMIZERS as BENCH_OPTIMIZERS
    from fused_optim.bench.specs import PRECISIONS, bytes_per_element
except ImportError as error:  # (the tables below come from the step benchmark's)
    sys.exit(
        f"gpu_kernel_timing: cannot import the checkout's fused_optim ({error}). Build it "
        "in place first, from the repository root: FORCE_CUDA=1 python3 setup.py build_ext --inplace"
    )

# name -> (class name, hyperparameters, bytes per element an ideal fp32 pass
# moves): the fused optimizers of `python -m fused_optim.bench`, with its
# hyperparameters and byte budgets (Adam 28, SGD with momentum 20, ...; for
# Lars and Lamb the update's, without their norms' passes).
OPTIMIZERS = {
    name: (BENCH_OPTIMIZERS[name].class_name, BENCH_OPTIMIZERS[name].kwargs,
           bytes_per_element(BENCH_OPTIMIZERS[name], PRECISIONS["fp32"]))
    for name in ALL_OPTIMIZERS
}
DEFAULT_OPTIMIZERS = "adam,adamw,sgd,rmsprop,adagrad"


def torch_takes(class_name: str, keyword: str) -> bool:
    """Whether torch.optim's constructor of that name takes ``keyword``
    (``capturable``, ``fused``); fused_optim's classes take torch's."""
    cls = getattr(torch.optim, class_name, None)
    return cls is not None and keyword in inspect.signature(cls).parameters


def tensors_per_launch(name: str) -> int:
    """Tensors per launch of fused_optim's kernel for this optimizer's step
    (csrc/cuda/README.md, "Tensors per launch"): the op's capacity for the
    param, the gradient and the state tensors its hyperparameters use."""
    import fused_optim

    spec = BENCH_OPTIMIZERS[name]
    op = getattr(fused_optim, spec.class_name)._op_name
    return next(r["tensors"] for r in fused_optim._C.launch_capacities()
                if r["op"] == op and r["operands"] == 2 + spec.state_tensors)


DEFAULT_LAYOUTS = "200x5000000,1x1000000000,4000x2048"
COPY_ELEMENTS = 2**28  # fp32: 1 GiB each way


def require_cuda():
    """Exits with a clear message unless a GPU and a CUDA build are there."""
    if not torch.cuda.is_available():
        sys.exit(
            f"gpu_kernel_timing: needs a CUDA GPU, and torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none: a CPU-only build'}) sees none. "
            "Run it on a GPU machine (bash scripts/gpu_check.sh runs it there)."
        )
    import fused_optim

    if not fused_optim.cuda_built():
        sys.exit(
            f"gpu_kernel_timing: {os.path.dirname(fused_optim.__file__)} was built without "
            "its CUDA kernels. Build them in place first, from the repository root: "
            "FORCE_CUDA=1 python3 setup.py build_ext --inplace"
        )
    return fused_optim


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        count, _, numel = item.strip().lower().partition("x")
        try:
            layouts.append((int(count), int(float(numel))))
        except ValueError:
            raise argparse.ArgumentTypeError(f"layout {item!r}: expected COUNTxNUMEL, e.g. 200x5000000")
    return layouts


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1")
    return value


def parse_optimizers(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}")
    return names


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def gpu_ms(fn, repeats: int) -> float:
    """Median GPU time of fn() between two events, each call from an idle stream."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, repeats: int) -> float:
    """Median host time to enqueue fn() (the GPU idle at the start)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn() captured in a CUDA graph, after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def copy_bandwidth_gb_s(repeats: int) -> float:
    src = torch.empty(COPY_ELEMENTS, device="cuda").uniform_(-1, 1)
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------


def make_params(count: int, numel: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for _ in range(count):
        p = torch.empty(numel, device="cuda").uniform_(-1, 1, generator=gen).requires_grad_()
        p.grad = torch.empty_like(p).uniform_(-1, 1, generator=gen)
        params.append(p)
    return params


def build(impl: str, name: str, params, fused_optim):
    """(optimizer, what it is). fused_optim gets its lr as a device tensor,
    read by the kernels at each step (the captured step then follows a
    scheduler, as in training); torch's peers a float, which every one of
    their paths takes (in a captured step it is a constant: the same work)."""
    class_name, hyper, _ = OPTIMIZERS[name]
    kwargs = dict(hyper)
    if impl == "fused_optim":
        kwargs["lr"] = torch.tensor(hyper["lr"], device="cuda")
        if torch_takes(class_name, "capturable"):
            kwargs["capturable"] = True
        return getattr(fused_optim, class_name)(params, **kwargs), "fused_optim"
    cls = getattr(torch.optim, class_name, None)
    if cls is None:
        raise LookupError(f"torch.optim has no {class_name}: no torch peer")
    if torch_takes(class_name, "capturable"):
        kwargs["capturable"] = True
    if torch_takes(class_name, "fused"):
        try:
            opt = cls(params, fused=True, **kwargs)
            opt.step()  # e.g. torch's fused Adagrad is CPU-only: it fails here
            return opt, "torch fused" + (" capturable" if "capturable" in kwargs else "")
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"  torch.optim.{class_name}(fused=True) unavailable here: {e}", flush=True)
    return cls(params, foreach=True, **kwargs), "torch foreach" + (
        " capturable" if "capturable" in kwargs else "")


def measure(impl, name, count, numel, args, fused_optim, bandwidth):
    _, _, bytes_per_element = OPTIMIZERS[name]
    params = make_params(count, numel, seed=0)
    opt, kind = build(impl, name, params, fused_optim)
    for _ in range(3):  # state, plans, workspaces
        opt.step()
    torch.cuda.synchronize()
    result = {
        "optimizer": name, "layout": f"{count}x{numel}", "impl": impl, "kind": kind,
        "tensors": count, "elements": count * numel,
        "bytes_per_step": bytes_per_element * count * numel,
        "eager_ms": gpu_ms(opt.step, args.repeats),
        "host_ms": host_ms(opt.step, args.repeats),
        "graph_ms": None,
    }
    try:
        graph = capture(opt.step)
        result["graph_ms"] = gpu_ms(graph.replay, args.repeats)
        del graph
    except Exception as e:  # a step that cannot be captured: say so, keep the rest
        result["graph_error"] = f"{type(e).__name__}: {e}"
        torch.cuda.synchronize()
    for key in ("graph", "eager"):
        ms = result[f"{key}_ms"]
        result[f"{key}_of_copy"] = (
            None if ms is None else result["bytes_per_step"] / (ms * 1e-3) / 1e9 / bandwidth
        )
    del opt, params
    return result


def describe(r) -> str:
    def part(key):
        ms = r[f"{key}_ms"]
        if ms is None:
            return f"{key} n/a"
        return f"{key} {ms:8.3f} ms ({r[f'{key}_of_copy']:6.1%})"

    line = f"{r['optimizer']:8s} {r['layout']:>14s}  {r['kind']:26s} {part('graph')}  {part('eager')}"
    line += f"  host {r['host_ms']:7.3f} ms"
    if r["impl"] == "fused_optim":
        line += f"  [{math.ceil(r['tensors'] / tensors_per_launch(r['optimizer']))} launches]"
    if "graph_error" in r:
        line += f"\n{'':26s}graph capture failed: {r['graph_error'][:300]}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Kernel-only (CUDA graph replay) step time of fused_optim vs torch.optim, "
                    "as a fraction of a device-to-device copy's bandwidth.",
        epilog="Run time with the defaults: not measured yet (no GPU run so far); "
               "scripts/gpu_check.sh gives it 90 s on an H200.")
    parser.add_argument("--optimizers", type=parse_optimizers, default=DEFAULT_OPTIMIZERS,
                        help=f"comma-separated, from {', '.join(OPTIMIZERS)} "
                             f"(default: {DEFAULT_OPTIMIZERS})")
    parser.add_argument("--layouts", type=parse_layouts, default=DEFAULT_LAYOUTS,
                        help=f"COUNTxNUMEL, comma-separated (default: {DEFAULT_LAYOUTS})")
    parser.add_argument("--impls", default="fused_optim,torch",
                        help="fused_optim and/or torch (its fastest capturable peer)")
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed calls per figure (median)")
    parser.add_argument("--json", metavar="PATH", help="write the results here (after each one)")
    args = parser.parse_args(argv)  # (string defaults go through `type` too)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not set(impls) <= {"fused_optim", "torch"}:
        parser.error(f"--impls: {impls}: expected fused_optim and/or torch")

    fused_optim = require_cuda()
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth_gb_s(args.repeats)
    report = {
        "device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "fused_optim": os.path.dirname(fused_optim.__file__),
        "copy_gb_per_s": bandwidth,
        "copy": f"{COPY_ELEMENTS * 4 / 2**30:.0f} GiB device-to-device copy, read + write counted",
        "results": [], "notes": [],
    }
    print(f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}: "
          f"copy {bandwidth:.0f} GB/s ({report['copy']})", flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    save()
    for name in args.optimizers:
        for count, numel in args.layouts:
            for impl in impls:
                try:
                    result = measure(impl, name, count, numel, args, fused_optim, bandwidth)
                except torch.OutOfMemoryError:
                    result, error = None, "out of memory"
                except Exception as e:  # one implementation failing: note it, go on
                    result, error = None, f"{type(e).__name__}: {str(e)[:500]}"
                if result is None:  # outside `except`: its traceback pins the tensors
                    torch.cuda.synchronize()
                    note = f"{name} {count}x{numel} {impl}: skipped: {error}"
                    report["notes"].append(note)
                    print(note, flush=True)
                else:
                    report["results"].append(result)
                    print(describe(result), flush=True)
                torch.cuda.empty_cache()
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
