"""The group options a step saw, to tell at the next step whether any
changed: what lets a step reuse its plan's checks and its kept op calls.

Note [group options]
A training loop steps with the same groups and options every time. Two
things a step derives from them are cached: the plan's buckets
(_planning.py, from the mode and precision options) and the kept calls'
arguments (_kept_calls.py, from every option but lr, which is read every
step: an lr scheduler sets a new one each step). Both are valid for as long
as every group holds the very option objects it held when they were made,
lr aside. Identity, not equality: ``group[key] = value`` always stores a new
object, and equality would miss a tensor that replaced an equal float.
A list option can change in place: its items are copied and compared by
identity too. An option that could change in place otherwise (a tensor, any
other object) makes the snapshot never match (``kept`` False): whatever
depends on it is derived afresh every step, as if nothing were cached.

The check costs about 1 us for a group of 15 options (2-core CPU): each
group's options are read with one ``itemgetter`` (by name, so a key removed
or renamed fails the read and a key added changes the group's length) and
compared by identity at C speed.
"""

from __future__ import annotations

import operator
from itertools import chain

import torch

# The option types that cannot change without being replaced.
_IMMUTABLE = frozenset((float, int, bool, str, type(None), torch.dtype))

_call = getattr(operator, "call", lambda function, argument: function(argument))  # (3.11+)


def _reader(keys: list):
    """A function returning a group's options ``keys`` as a tuple."""
    if len(keys) == 1:  # (itemgetter of one key returns the value itself)
        key = keys[0]
        return lambda group: (group[key],)
    return operator.itemgetter(*keys)


def _identical(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class GroupOptions:
    """Every option of every group but ``lr``, as a step saw them
    (Note [group options]). ``params`` is compared by identity only: the
    plan checks its contents (_bucket.Plan.same_params)."""

    def __init__(self, param_groups: list) -> None:
        self.lengths = list(map(len, param_groups))
        self.readers = [_reader([key for key in group if key != "lr"]) for group in param_groups]
        self.values = tuple(chain.from_iterable(map(_call, self.readers, param_groups)))
        self.lists = []  # (a list option, a copy of its items)
        self.kept = True
        params = set(map(id, map(operator.itemgetter("params"), param_groups)))
        # (the options of a type outside _IMMUTABLE, found at C speed)
        mutable = map(operator.not_, map(_IMMUTABLE.__contains__, map(type, self.values)))
        for value, is_mutable in zip(self.values, mutable):
            if not is_mutable or id(value) in params:
                continue
            kind = type(value)
            if kind in (tuple, list) and _IMMUTABLE.issuperset(map(type, value)):
                if kind is list:
                    self.lists.append((value, list(value)))
            else:
                self.kept = False

    def unchanged(self, param_groups: list) -> bool:
        """Whether the groups hold the very options they held (lr aside)."""
        if not self.kept or list(map(len, param_groups)) != self.lengths:
            return False
        try:
            live = chain.from_iterable(map(_call, self.readers, param_groups))
            if not all(map(operator.is_, live, self.values)):
                return False
        except KeyError:  # (an option removed, another added in its place)
            return False
        return not self.lists or all(_identical(live, copy) for live, copy in self.lists)
