"""The state arena: new CPU state tensors packed into one buffer per state
name and dtype.

Note [state arena]
torch.optim gives each param's state its own tensors, each its own heap
allocation, so a step over thousands of small tensors walks memory in
thousands of short, scattered runs. The arena keeps torch's layout as
users see it (``state[p]["exp_avg"]`` is still a tensor of ``p``'s shape
and strides) but makes each such tensor a view of one buffer per (state
name, dtype), in the order the step visits the params: the step then
reads each state stream in memory order. Made param by param, the state of
an optimizer with two state tensors per param (Adam's moments) lies
interleaved in memory, each stream in pieces; on `many-small` (2,000
tensors) the arena made the Adam step 9-14% faster, and left SGD (one
state tensor per param, already nearly in order) as it was, -2 to +3%
(benchmarks/flat_state_arena.py,
benchmarks/results/flat-state-arena-cpu-2core-epyc-2026-12-05.md).

What is packed: state tensors the step creates (``_init_state``: moments,
momentum buffers, Adagrad's sums at construction), when they are plain,
contiguous CPU tensors of at most ``MAX_PACKED_ELEMENTS``, at least two of
a name and dtype. Each view starts on a 64-byte boundary. The arena makes
them (``make``): ``_init_state`` asks for each new state tensor
(``NewTensor``: like which param, which dtype, which initial value), and
the plan has all of a step's new state made at once, packed as views of a
buffer made with the initial value, the others as tensors of their own.
(At first they were made as tensors of their own and then copied into
the buffer; made in place, the constructor and first step on `many-small`
take 12% less time for SGD, 24% for Adagrad, 38% for Adam:
benchmarks/results/first-step-cpu-2core-epyc-2026-12-07.md. The views of
1-d params' state then came from one split of the buffer, ``_flat_views``,
with the plan's decisions made once per kind of param, Note [a first
gradient's short way]: 0.6-0.7 of that time again,
first-step-cpu-2core-epyc-2026-12-07-kinds.md.) Why small
ones only: a large tensor is a long run in memory already, and the costs
below grow with it. Not packed:
- the state Adagrad makes at construction for a group that torch.optim's
  code steps (differentiable=True: its updates record history in place,
  which autograd refuses on a second view of one buffer);
- state loaded from a checkpoint or replaced by the user: it stays as
  given (a checkpoint saved from packed state loads as views of one buffer
  again: ``torch.save`` writes a shared storage once and ``torch.load``
  restores the views);
- state made inside a ``torch.compile``d step (_traced.py): views of one
  buffer that the step mutates are aliased graph inputs, which made the
  compile 1.5-2.1x slower (measured at 200 and 500 params). For the same
  reason a traced step unpacks the packed state it reads (``unpack``, in
  ``_init_group``, which runs as the step is traced, not at each compiled
  step): with state packed before (Adagrad's sums at construction, an
  eager first step, a checkpoint of packed state) Inductor cannot update
  aliased inputs in place, and every compiled step cloned all but one
  state tensor of a buffer before the op and copied it back after (two
  more passes over that state);
- CUDA state: the caching allocator would keep the per-param tensors'
  memory reserved beside the arena, and the kernels' chunked launches do
  not walk tensors one after another (unmeasured on a GPU).

torch.optim's differentiable step (differentiable=True) updates its state in
place with history, which autograd refuses on the second view of one
buffer ("a leaf Variable that requires grad is being used in an in-place
operation"): the state of a param about to take such a step leaves the
arena first (``unpack``), as Adagrad's state made at construction for
such a group never enters it.

Sparse gradients go through torch.optim's own code, which adds a sparse
tensor into the state (``buf.add_(grad)``); torch's CPU kernel for a
coalesced sparse tensor whose values are scalars writes such a sum at the
wrong place when the dense tensor starts at an offset into its storage
(it counts the offset twice: wrong values, and writes past the end of the
buffer). torch.optim never meets it, its state tensors starting their own
storage; ours would, so the state of a param about to take a sparse
update leaves the arena first (``unpack``). (torch.optim stepping state
loaded from a checkpoint of ours meets the bug with such gradients, as
with any state given as views: the views are restored.)

Why views of one storage, not a storage of its own per tensor (an
``UntypedStorage`` slice of the buffer's, data at offset 0: what torch's
kernels expect, saved and copied alone): tried, with the same memory
layout, the slices made the Adam step on `many-small` 1.5-6% slower than
the views, half the arena's gain (interleaved, 2026-12-05, 2-core EPYC).
Likely the host side: the step reads every tensor's storage, one object
per buffer with views, 2,000 objects with slices (not profiled further).

Costs, on purpose: ``torch.save`` of one state tensor alone writes its whole
buffer (a view saves its storage; ``optimizer.state_dict()``, DCP and
checkpoints of the whole state are unaffected), and a param's state
removed from the optimizer keeps its part of the buffer alive until every
view of it is gone.
"""

from __future__ import annotations

import torch

# Where each view starts: a cache line, and a full vector of the widest
# loads the CPU loops use (AVX-512).
_ALIGN_BYTES = 64

# The largest state tensor packed (256 KiB in float32: 4096 cache lines,
# where the hardware prefetcher's ramp-up at a tensor's start no longer
# counts).
MAX_PACKED_ELEMENTS = 1 << 16


class NewTensor:
    """A new state tensor asked for: like ``param`` (its shape, strides
    where dense, device), of ``dtype``, every element ``fill``."""

    __slots__ = ("param", "dtype", "fill")

    def __init__(self, param, dtype: torch.dtype, fill) -> None:
        self.param, self.dtype, self.fill = param, dtype, fill

    def make(self) -> torch.Tensor:
        """The tensor, in memory of its own (torch.optim's state)."""
        return torch.full_like(self.param, self.fill, dtype=self.dtype,
                               memory_format=torch.preserve_format)


def make(requests: list) -> None:
    """Sets ``state[name]`` for each name of each (state dict, names,
    ``NewTensor``) of ``requests``, in the order given: views of one new
    buffer per (name, dtype) where the arena takes them (Note [state
    arena]), else tensors of their own. (Written for speed: a first step
    calls it for every param's state, Note [a first gradient's short way]
    in _planning.py.)"""
    members: dict = {}  # (name, dtype) -> [(state, NewTensor, numel, whether 1-d)]
    alone = []
    for state, names, request in requests:
        if len(names) > 1:
            # (keys in the order asked, torch.optim's, whatever order the
            # buffers below are made in)
            state.update(dict.fromkeys(names))
        param = request.param
        if _packable(param):
            member = (state, request, param.numel(), param.stride() == (1,))
            for name in names:
                members.setdefault((name, request.dtype), []).append(member)
        else:
            alone.extend((state, name, request) for name in names)
    for (name, dtype), states in members.items():
        if len(states) < 2:
            alone.extend((state, name, request) for state, request, _, _ in states)
            continue
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        fill = states[0][1].fill
        one_fill = all(request.fill == fill for _, request, _, _ in states)
        starts, length = [], 0
        for _, _, numel, _ in states:
            starts.append(length)
            length += numel + -numel % align
        # (with one fill, the buffer is made with it: one pass)
        buffer = torch.full((length,), fill if one_fill else 0, dtype=dtype)
        flat_views = iter(_flat_views(buffer, states, starts))
        for (state, request, _, is_1d), start in zip(states, starts):
            param = request.param
            # (a view of the param's own strides, which for a contiguous
            # tensor may differ from the default ones in size-1 dims, as
            # full_like's preserve_format keeps them: the op compares them)
            view = state[name] = (next(flat_views) if is_1d
                                  else buffer.as_strided(param.shape, param.stride(), start))
            if not one_fill:
                view.fill_(request.fill)
    for state, name, request in alone:
        state[name] = request.make()


def _flat_views(buffer, members: list, starts: list) -> list:
    """The views of ``buffer`` for its 1-d members (stride 1), in order,
    made by one ``split_with_sizes`` over the whole buffer (the pieces
    between them are split off and dropped): 2,000 views in half the time
    of 2,000 ``as_strided`` calls."""
    sizes, kept, end = [], [], 0
    for (_, _, numel, is_1d), start in zip(members, starts):
        if is_1d:
            if start > end:
                sizes.append(start - end)
                kept.append(False)
            sizes.append(numel)
            kept.append(True)
            end = start + numel
    sizes.append(buffer.numel() - end)
    kept.append(False)
    return [piece for piece, keep in zip(buffer.split_with_sizes(sizes), kept) if keep]


def unpack(state: dict, set_item=dict.__setitem__) -> None:
    """Gives each state tensor of ``state`` that shares its storage (an
    arena view, or a view restored by ``torch.load``) memory of its own,
    the same values and strides, by ``set_item(state, name, tensor)`` (a
    journal's set, to be taken back): for torch.optim's sparse updates, its
    differentiable step and a traced step (Note [state arena])."""
    for name, tensor in list(state.items()):
        if _in_shared_storage(tensor):
            set_item(state, name, tensor.clone(memory_format=torch.preserve_format))


def _in_shared_storage(tensor) -> bool:
    # (a contiguous tensor that is not the whole of its storage: packed
    # ones are contiguous, and the clone of one keeps its strides)
    return (
        type(tensor) is torch.Tensor
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and (tensor.storage_offset() != 0
             or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size())
    )


def _packable(param) -> bool:
    # (what full_like makes of it: a plain contiguous CPU tensor of its
    # shape and strides; a tensor subclass such as a DTensor makes its own)
    return (
        type(param) in (torch.Tensor, torch.nn.Parameter)
        and param.is_cpu
        and param.layout == torch.strided
        and 0 < param.numel() <= MAX_PACKED_ELEMENTS
        and param.is_contiguous()
    )
