"""What a step changed in the optimizer before it wrote any tensor, so that
a step that raises can take it back (Note [validate before mutating] in
_step.py).

Before its first write a step may create state for params that got their
first gradient, and bring existing state to the group's precision options
(cast moments to ``state_dtype``, make or drop the master copy, move a step
counter). Each such change goes through the journal; ``undo`` restores the
state dicts exactly, in reverse order: the same dict objects, the same
tensor objects, in the same key order (``state_dict()`` lists them so), so
a float32 master dropped by a step that then failed is the same master, in
the same place, afterwards.
"""

from __future__ import annotations

_MISSING = object()


class Journal:
    def __init__(self, optimizer_state) -> None:
        self._optimizer_state = optimizer_state
        self._entries: list = []
        # id -> (a state dict a key was popped from, its keys before): put
        # back, a key would come last (dicts keep insertion order)
        self._key_orders: dict = {}
        # The params whose master copy the step made (checked at the next
        # step: Note [a loaded master copy] in _planning.py).
        self.new_masters: list = []

    def state_for(self, param) -> dict:
        """The param's state dict, created if missing; new keys the step
        adds to it are removed again by ``undo``."""
        state = self._note(param)
        if state is None:
            state = self._optimizer_state[param] = {}
        return state

    def watch(self, param) -> None:
        """Notes the param's state keys (or that it has no state), without
        creating its state: ``undo`` removes the keys added since, and the
        state dict itself if it had none (state that code other than ours
        makes: torch.optim's, for a fused=False group)."""
        self._note(param)

    def _note(self, param) -> dict | None:
        # (one lookup: a tensor's hash is Python code, and a first step
        # notes every param)
        state = self._optimizer_state.get(param)
        self._entries.append(("state", param, None if state is None else set(state)))
        return state

    def set(self, state: dict, key, value) -> None:
        self._entries.append(("key", state, key, state.get(key, _MISSING)))
        state[key] = value

    def pop(self, state: dict, key) -> None:
        if key in state:
            self._key_orders.setdefault(id(state), (state, list(state)))
            self._entries.append(("key", state, key, state[key]))
            del state[key]

    def undo(self) -> None:
        for entry in reversed(self._entries):
            if entry[0] == "key":
                _, state, key, old = entry
                if old is _MISSING:
                    state.pop(key, None)
                else:
                    state[key] = old
            else:
                _, param, previous = entry
                if previous is None:
                    self._optimizer_state.pop(param, None)
                else:
                    state = self._optimizer_state[param]
                    for key in [k for k in state if k not in previous]:
                        del state[key]
        for state, keys in self._key_orders.values():
            if list(state) != keys:
                place = {key: i for i, key in enumerate(keys)}.get
                items = sorted(state.items(), key=lambda item: place(item[0], len(keys)))
                state.clear()  # (the same dict object, its keys in their old order)
                state.update(items)
        self._key_orders.clear()
        self._entries.clear()
        self.new_masters.clear()

    def __bool__(self) -> bool:
        return bool(self._entries)
