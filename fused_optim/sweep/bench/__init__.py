"""Lockstep benchmark: K configurations trained in lockstep against K
sequential runs with torch.optim, wall time per training step.

Run ``python -m fused_optim.sweep.bench`` (or ``python -m fused_optim.bench
--sweep``, which ``bash scripts/bench.sh --sweep`` runs); ``--help`` lists
the options. The default run takes about 3-5 minutes on 2 cores.

The package, a file per job:

* ``configs.py``: the K configurations of a run (the families in turn)
* ``sides.py``: the two sides (lockstep; K sequential torch.optim runs)
  and the batches they share
* ``timing.py``: the calibration of torch's implementations, and the
  interleaved blocks of one (model, K) cell
* ``memory.py``: the peak RSS of each side, in a fresh process
* ``report.py``: the console table, Markdown and JSON
* ``cli.py``, ``__main__.py``: the command line

What is measured, for K = 1, 4, 16, 64 and two models of
``fused_optim.sweep.digits`` (``mlp``: 64-64-64-10 with ReLU, ``cnn``),
batches of 64 from the digits data, cross-entropy:

* Configurations: a realistic mix cycling through the seven families of
  ``digits.OPTIMIZER_FAMILIES`` (SGD, momentum, Nesterov, Adagrad, RMSprop,
  Adam, AdamW), each with a learning rate of its own grid (the middle one
  first, then outwards), so every K > 1 mixes optimizer types; K = 1 is
  AdamW with lr 1e-3. Both sides train the same configurations from the same
  initial weights on the same batches for the same number of steps.
* Lockstep step: ``lockstep.backward(x, y); lockstep.update()`` (one batched
  forward and backward for all K: ``baddbmm`` for the MLP, vmap for the
  CNN; one fused_optim call per optimizer type).
* Sequential step: for each of K separate models (copies of the initial
  module), each with its own torch.optim optimizer: ``zero_grad(set_to_none=
  True)``, forward, loss, backward, ``optimizer.step()``.
* Sequential optimizers use torch's fastest CPU implementation, chosen by
  measurement: for each optimizer family, on each model, a calibration
  first trains with every implementation torch has for the class
  (``fused=True`` where torch accepts it on CPU: SGD, Adagrad, Adam, AdamW;
  ``foreach=True``; and the for-loop ``foreach=False``, torch's CPU
  default), interleaved in blocks, timing only ``optimizer.step()``; the
  implementation with the lowest median step time is used. The report
  lists each family's times and the one chosen.
* Timing (the protocol of ``fused_optim/bench/``): both sides are warmed
  up (a step, three steps timed one by one, whose median on the sequential
  side sets the block size unless ``--steps`` does: ~0.15 s of sequential
  training; then one untimed block each), then lockstep blocks and
  sequential blocks alternate within one process (``interleaved_times``:
  A B, B A, ...) for ``--rounds`` rounds, so that drifts of a shared machine
  hit both alike. The load average is recorded; a busy machine is noted.
  Reported per (model, K): the median block time per step of each side
  (ms/step), speed-up = sequential / lockstep, the median over rounds of
  the per-round ratio (each lockstep block against the sequential block
  next to it), and ms per configuration per step.
* Memory: each (model, K, side) runs in a fresh subprocess (``--rss-probe``)
  that imports, loads the data, lowers its peak RSS to its current RSS
  (Linux ``/proc/self/clear_refs``: otherwise a peak while importing can
  hide what training adds), records its peak RSS (the baseline), builds
  the side, trains ``--rss-steps`` steps and records its peak RSS again.
  Reported: the peak in MiB, and how far above the baseline. The peak is
  Linux's VmHWM (``/proc/self/status``), ``ru_maxrss`` elsewhere: in a
  child, Linux's ``ru_maxrss`` is at least the RSS of the parent that
  started it (here, the benchmark's own process).

Targets, on a 2-core CPU (the machine of ``benchmarks/results``), on the
MLP: speed-up >= 1x at K = 1, >= 4x at K = 16, >= 6x at K = 64 (the
``target`` column says whether each was met; the CNN has no target).

Examples::

    python -m fused_optim.sweep.bench                      # ~3-5 min on 2 cores
    python -m fused_optim.sweep.bench --models mlp --ks 1,16,64 \\
        --markdown benchmarks/results/sweep-cpu-$(date +%F).md \\
        --json benchmarks/results/sweep-cpu-$(date +%F).json
    python -m fused_optim.sweep.bench --models mlp --ks 1,4 --rounds 6 --no-rss   # a quick look
"""

from fused_optim.sweep.bench.cli import main
from fused_optim.sweep.bench.configs import FAMILIES, family_of, mix, sweep_configs
from fused_optim.sweep.bench.sides import torch_impls

__all__ = ["FAMILIES", "family_of", "main", "mix", "sweep_configs", "torch_impls"]
