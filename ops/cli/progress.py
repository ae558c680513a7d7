"""Progress bars that animate only on a terminal.

On a TTY this is a tqdm bar on stderr. Anywhere else (a log file, systemd's journal, a CI log, a pipe)
a bar's frames are noise: every refresh would become a line. There it writes no frames, only a plain
status line at most every `every_s` seconds (FEDMASK_PROGRESS_EVERY, default 30) and, for bars that
are kept (`leave`), one line when it closes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from tqdm import tqdm

EVERY_ENV = "FEDMASK_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """The subset of tqdm the CLI uses: update, set_postfix(_str), write, close."""

    def __init__(self, total: int, desc: str, unit: str = "round", *, stream: IO[str] | None = None,
                 enabled: bool = True, leave: bool = True, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.enabled, self.leave = total, desc, unit, enabled, leave
        self.every_s = _every_s() if every_s is None else every_s
        self.clock = clock
        self.n, self.postfix = 0, ""
        self.started = self._last_line = clock()
        self._bar: tqdm[Any] | None = None
        if enabled and is_terminal(self.stream):
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=leave)

    @property
    def animated(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        self.set_n(self.n + n)

    def set_n(self, n: int) -> None:
        self.n = n
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()
        else:
            self._maybe_line()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            self._maybe_line()

    def set_postfix(self, values: Mapping[str, object]) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def write(self, line: str) -> None:
        """A message line that does not break the bar."""
        if self._bar is not None:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def line(self) -> str:
        post = f" [{self.postfix}]" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s, {self.clock() - self.started:.0f}s{post}"

    def _maybe_line(self) -> None:
        now = self.clock()
        if self.enabled and now - self._last_line >= self.every_s:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.leave:
            print(self.line(), file=self.stream, flush=True)
            self.enabled = False  # close twice, one line
