"""A progress line on stderr for long commands (bench, warmup, analyze, the examples' training
loops), without a dependency: ``[i/n] what, elapsed, eta``. On a terminal the line is redrawn in
place; otherwise (a log, a pipe, a test) each step is its own line."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


def _clock(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """``p = Progress(n, "bench")``; ``p.step("spmm M=4 ...")`` before each unit of work;
    ``p.clear()`` before printing a result on stdout, so a redrawn line never interleaves with it;
    ``p.done()`` at the end. ``enabled=False`` (or ``total == 0``) prints nothing."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = int(total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.i = 0
        self.t0 = time.perf_counter()
        self._live = False
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self._tty = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, what: str) -> None:
        """Work item ``i + 1`` of ``total`` (``what``) starts now."""
        self.i += 1
        if not self.enabled:
            return
        el = self.elapsed()
        eta = ""
        if self.i > 1:
            eta = f", about {_clock(el / (self.i - 1) * (self.total - self.i + 1))} left"
        line = f"{self.label} [{self.i}/{self.total}] {what} ({_clock(el)} elapsed{eta})"
        self._write(line)

    def status(self, what: str) -> None:
        """Say what happens between steps (preparing inputs) without counting a step."""
        if self.enabled:
            self._write(f"{self.label} [{self.i}/{self.total}] {what} ({_clock(self.elapsed())} elapsed)")

    def note(self, text: str) -> None:
        """A line that stays (a warning, a file written)."""
        if self.enabled:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def _write(self, line: str) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + line)
            self._live = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self._live:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._live = False

    def done(self, what: str = "done") -> None:
        if self.enabled:
            self.clear()
            self.stream.write(f"{self.label}: {what} in {_clock(self.elapsed())}\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clear()
