"""Fault injection for the crash suites (tests/faults/): `<ENV>=<point>[:<n>]` makes a process signal
itself the n-th time (default 1) it reaches <point>, so a test can stop it at one exact step of its
persist/ack or close/publish sequence. The aggregator (FEDMASK_FAULT) and the worker
(FEDMASK_WORKER_FAULT) each declare their points; unset (production) a hit is one attribute test.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

from shared.errors import ConfigError


def parse_fault(env: str, points: Sequence[str], spec: str | None) -> tuple[str, int] | None:
    """None when unset or empty, else (point, n); ConfigError naming the points otherwise."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    count = count or "1"
    if point not in points or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{env} must be <point>[:<n>] with n >= 1 and point one of {', '.join(points)}; "
                          f"got {spec!r}")
    return point, int(count)


class FaultPoints:
    """Read once from the environment at construction; `hit(point)` at each step of the sequence."""

    def __init__(self, env: str, points: Sequence[str], *, who: str, log: logging.Logger,
                 sig: signal.Signals = signal.SIGKILL) -> None:
        self.env, self.who, self.log, self.sig = env, who, log, sig
        self.plan = parse_fault(env, points, os.environ.get(env))
        self.hits = 0

    def hit(self, point: str) -> None:
        if self.plan is None or self.plan[0] != point:
            return
        self.hits += 1
        if self.hits == self.plan[1]:
            self.log.warning("%s=%s:%d reached: %s to the %s", self.env, point, self.hits, self.sig.name, self.who)
            # To this thread: a process-directed SIGSTOP stops the process only once another thread
            # (the main one) takes it, and a loaded machine lets this one run on meanwhile.
            signal.pthread_kill(threading.get_ident(), self.sig)
