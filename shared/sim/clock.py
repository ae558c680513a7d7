"""A virtual clock and its event queue: the simulator's time, advanced by events, never by sleeping.

Events are ordered by (time, sequence number): two events at the same simulated instant run in the
order they were scheduled, so a run is deterministic and, for example, a merged mask published
before the next task arrives before it too.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    device: str = field(compare=False, default="")
    data: Any = field(compare=False, default=None)


class EventQueue:
    """A min-heap of events; `now` is the time of the last event popped (the virtual clock)."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self.now = 0.0
        self.popped = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, time: float, kind: str, device: str = "", data: Any = None) -> Event:
        """Schedule an event at absolute simulated time `time` (never in the past)."""
        if not time >= self.now or math.isnan(time):
            raise ValueError(f"event {kind!r} at {time} is before the clock ({self.now})")
        ev = Event(time, self._seq, kind, device, data)
        self._seq += 1
        heapq.heappush(self._heap, ev)
        return ev

    def after(self, delay: float, kind: str, device: str = "", data: Any = None) -> Event:
        if delay < 0:
            raise ValueError(f"negative delay {delay} for event {kind!r}")
        return self.at(self.now + delay, kind, device, data)

    def pop(self) -> Event:
        ev = heapq.heappop(self._heap)
        self.now = ev.time
        self.popped += 1
        return ev

    def peek_time(self) -> float:
        return self._heap[0].time if self._heap else math.inf
