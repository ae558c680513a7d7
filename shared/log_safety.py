"""Logging what a device sent without letting it write the log: escaping, a JSON formatter, and
rejections logged at a bounded rate.

Every field that came from a device (routing key, device id, header values, a reason built from the
message) is untrusted text. `printable` turns any of them into one short line of visible characters,
so a routing key holding a newline and a JSON object cannot start a line of its own, and
`JsonLogFormatter` encodes the whole record with json.dumps, so nothing in a message can close the
"msg" string either (the old format string pasted the message between quotes as it was).

Under a flood one line per rejected message (often a traceback) is itself the attack: `RejectionLog`
writes the first rejection of a reason at once, then only counts, and writes one summary line per
reason per window with the number it kept quiet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

DEFAULT_LIMIT: Final = 200  # characters kept of one untrusted field
_SAFE_CATEGORIES: Final = frozenset({"L", "M", "N", "P", "S"})  # first letter of unicodedata.category


def printable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as one line of visible characters, at most `limit` of them plus a "...(+N)" note.

    Bytes are read as UTF-8 (undecodable bytes shown as \\xNN). Backslash and both quotes are escaped;
    every character that is not a letter, mark, digit, punctuation, symbol or the plain space (control
    and format characters, line and paragraph separators, surrogates, unassigned code points) is shown
    as \\xNN, \\uNNNN or \\UNNNNNNNN. The result is the same for the same input, so it can be grepped."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", errors="backslashreplace")
    else:
        text = value if isinstance(value, str) else repr(value)
    out: list[str] = []
    for i, ch in enumerate(text):
        if i >= limit:
            return "".join(out) + f"...(+{len(text) - i} chars)"
        if ch in "\\\"'":
            out.append("\\" + ch)
        elif ch == " " or unicodedata.category(ch)[0] in _SAFE_CATEGORIES:
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: t, level, logger, msg (and exc for a traceback), each encoded by
    json.dumps with ensure_ascii, so no message can add a line or a field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"t": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=True)


@dataclass
class _Quiet:
    window_start: float
    suppressed: int = 0
    last: str = ""


class RejectionLog:
    """Log rejections at a bounded rate: per reason, the first in each `window` seconds is written in
    full, the rest are counted; the count comes out as one summary line when the window has passed
    (on the next rejection of that reason, or on `flush`, which the service's ticker calls).
    `counts` holds every rejection seen, by reason. Thread-safe."""

    def __init__(self, logger: logging.Logger, *, window: float = 10.0, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.window, self.level, self.clock = logger, window, level, clock
        self.counts: dict[str, int] = {}
        self._quiet: dict[str, _Quiet] = {}
        self._lock = threading.Lock()

    def note(self, reason: str, detail: str, *, exc_info: bool | BaseException = False) -> None:
        """One rejection. `detail` must already be escaped (printable) where it holds device input;
        `reason` is escaped here. A traceback (exc_info) is only written with the line that is written."""
        reason = printable(reason, 64)
        now = self.clock()
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            quiet = self._quiet.get(reason)
            if quiet is not None and now - quiet.window_start < self.window:
                quiet.suppressed += 1
                quiet.last = detail
                return
            summary = self._summary(reason, quiet, now) if quiet is not None else None
            self._quiet[reason] = _Quiet(window_start=now)
        if summary:
            self.logger.log(self.level, "%s", summary)
        self.logger.log(self.level, "rejected (%s): %s", reason, detail, exc_info=exc_info)

    def flush(self) -> None:
        """Write the summary of every reason whose window has passed with rejections kept quiet."""
        now = self.clock()
        lines = []
        with self._lock:
            for reason, quiet in list(self._quiet.items()):
                if now - quiet.window_start >= self.window:
                    line = self._summary(reason, quiet, now)
                    if line:
                        lines.append(line)
                    del self._quiet[reason]
        for line in lines:
            self.logger.log(self.level, "%s", line)

    @staticmethod
    def _summary(reason: str, quiet: _Quiet, now: float) -> str | None:
        if not quiet.suppressed:
            return None
        return (f"rejected ({reason}) {quiet.suppressed} more times in the last {now - quiet.window_start:.0f} s, "
                f"not logged one by one; the last: {quiet.last}")
