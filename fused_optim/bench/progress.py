"""Progress on stderr: how far the running block has got, while it runs,
and a line per block when it ends (stdout keeps only the tables)."""

from __future__ import annotations

import math
import shutil
import sys
import time

# On a terminal the progress line is rewritten in place: every round, but no
# more often than this (rounds of small blocks take milliseconds).
LIVE_EVERY_S = 0.2
# Elsewhere (a pipe, a log file) each update is a line of its own: one per
# this many seconds keeps a log short and still shows a long block moving.
PLAIN_EVERY_S = 10.0


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BlockProgress:
    """Reports the running block: "warm-up torch-fused (2/4), 3 s", then
    "round 17/45, 6 s, ~10 s left".

    ``live`` (default: whether the stream is a terminal) rewrites one line in
    place; otherwise an update is a plain line, at most one per ``every_s``
    (default PLAIN_EVERY_S). Updates run between the timed rounds, never
    inside a timed call.
    """

    def __init__(self, stream=None, clock=time.monotonic, live: bool | None = None,
                 every_s: float | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s if every_s is not None else (
            LIVE_EVERY_S if self.live else PLAIN_EVERY_S)
        self.label = ""
        self.rounds = 0
        self.block_started = self.rounds_started = self.last_update = 0.0
        self.live_width = 0  # characters of the live line now on the terminal

    def start(self, label: str) -> None:
        """A block begins (its set-up and warm-up first)."""
        self.label = label
        self.block_started = self.clock()
        # A terminal shows the block at once; a log gets its first line only
        # once the block has run every_s, so that short blocks add none.
        self.last_update = -math.inf if self.live else self.block_started

    def phase(self, text: str) -> None:
        """A step of the block's set-up, e.g. "warm-up torch-fused (2/4)"."""
        self._maybe_update(f"{self.label}: {text}, "
                           f"{self.clock() - self.block_started:.0f} s")

    def begin_rounds(self, rounds: int) -> None:
        self.rounds = rounds
        self.rounds_started = self.clock()

    def round_done(self, done: int) -> None:
        """After round `done` of `rounds`; the last one is left to finish()."""
        if done >= self.rounds:
            return
        now = self.clock()
        left = (now - self.rounds_started) / done * (self.rounds - done)
        self._maybe_update(f"{self.label}: round {done}/{self.rounds}, "
                           f"{now - self.block_started:.0f} s, ~{left:.0f} s left")

    def note(self, line: str) -> None:
        """A line of its own (a failure, a skipped block) in the middle of a block."""
        self._clear()
        self._write(line + "\n")

    def finish(self, line: str) -> None:
        """The block's result line replaces the progress line."""
        self.note(line)

    def _maybe_update(self, text: str) -> None:
        now = self.clock()
        if now - self.last_update >= self.every_s:
            self.last_update = now
            self._update(text)

    def _update(self, text: str) -> None:
        if not self.live:
            self._write(text + "\n")
            return
        # A line wider than the terminal wraps, and "\r" then returns only to
        # the start of its last row: cut it to fit.
        text = text[: shutil.get_terminal_size().columns - 1]
        self._write("\r" + text.ljust(self.live_width))
        self.live_width = len(text)

    def _clear(self) -> None:
        if self.live_width:
            self._write("\r" + " " * self.live_width + "\r")
            self.live_width = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
