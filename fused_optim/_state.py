"""``optimizer.state`` that counts its writes, so a cached plan sees them.

torch.optim reads ``self.state[p]`` for every param on every step, so a
user or a wrapper may replace a param's whole state dict between steps
(``opt.state[p] = {...}``) and the next step uses it. Our cached plan holds
each param's state dict to avoid that lookup (it costs about 0.1 ms per
1000 params, more than the rest of the host work of a step). Instead, every
way of writing to the mapping bumps ``writes``, which is part of the plan's
signature: a replaced dict rebuilds the plan, a step that writes nothing
costs one integer comparison. Reads, and writes *into* a param's state dict
(``opt.state[p]["exp_avg"] = t``), need no counting: the step reads the
tensors from the dicts each time.

It is a ``collections.defaultdict(dict)``, as torch.optim's is; pickling and
``copy.deepcopy`` keep the type.
"""

from __future__ import annotations

from collections import defaultdict


class OptimizerState(defaultdict):
    __slots__ = ("writes",)

    def __init__(self, entries=()) -> None:
        super().__init__(dict, entries)
        self.writes = 0

    def __reduce__(self):
        return type(self), (dict(self),)

    def _written(self) -> None:
        self.writes += 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._written()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._written()

    def __ior__(self, other):
        result = super().__ior__(other)
        self._written()
        return result

    def pop(self, key, *default):
        if key in self:
            self._written()
        return super().pop(key, *default)

    def popitem(self):
        self._written()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._written()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._written()

    def setdefault(self, key, default=None):
        if key not in self:
            self._written()
        return super().setdefault(key, default)
