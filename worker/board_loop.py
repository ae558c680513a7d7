"""What every board's worker does the same way, whatever it trains (worker/runtime.py's FedMask
Worker and worker/strategy_board.py's StrategyBoard): the consume loop with its signal handling and
the per-message stats log."""

from __future__ import annotations

import json
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.amqp import AmqpSettings, Consumer, Delivery, Outcome, Publisher, device_queue
from shared.errors import FedMaskError


@dataclass(frozen=True)
class Profile:
    """Emulates a board on one machine: thread count and a slowdown applied to training time."""

    threads: int
    slowdown: float


PROFILES = {"jetson": Profile(threads=1, slowdown=1.0), "pi4": Profile(threads=1, slowdown=5.0)}


class BoardLoop(ABC):
    # Set by the subclass's __init__.
    amqp: AmqpSettings
    profile: Profile
    stats_path: Path  # one JSON line per message: what a board spends (ops/fleet/workers.worker_stats)
    stop_event: threading.Event
    failure: FedMaskError | None
    _publisher: Publisher | None

    @property
    @abstractmethod
    def device_id(self) -> str: ...

    @abstractmethod
    def enrol(self) -> None: ...

    @abstractmethod
    def on_delivery(self, d: Delivery) -> Outcome: ...

    def run(self) -> None:
        """Until SIGTERM/SIGINT (or stop_event): the delivery in hand is settled, the rest stay queued.
        A handler is needed: as PID 1 in a container, a process without one ignores SIGTERM."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda _s, _f: self.stop_event.set())
        torch.set_num_threads(self.profile.threads)
        self.enrol()
        consumer = Consumer(self.amqp, device_queue(self.device_id), self.on_delivery, prefetch=1)
        try:
            consumer.run(self.stop_event)
        finally:
            if self._publisher is not None:
                self._publisher.close()
        if self.failure is not None:
            raise self.failure

    def _record(self, **fields: object) -> None:
        with self.stats_path.open("a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), **fields}) + "\n")
