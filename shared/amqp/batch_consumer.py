"""`BatchConsumer`: a `Consumer` whose handler takes the deliveries waiting in the prefetch window as one
list and returns one result per delivery; the batch is settled in one hand-off and one commit.

Why: handing each delivery to the handler thread, settling it through its own
add_callback_threadsafe and committing per settlement held the aggregator's own consumer to 0.54x a
plain pika consumer acking without work (docs/results.md, issue 14), and a per-delivery handler
cannot put a window's updates into one Redis round trip.

Forming a batch (handler thread): the first delivery waiting, then every other one already queued by
the connection thread, up to `batch_max`; if that is fewer, it waits at most `linger` seconds for
more. Under load the batch is whatever arrived while the previous one was being handled, so batches
grow with the load and a lone delivery waits only `linger`. `batch_max` defaults to half the prefetch:
the broker then delivers the next half-window while this one is handled (in transaction mode an ack
frees its prefetch slot only at the commit).

Results: an `Outcome`, or an exception for a delivery the handler failed on; that delivery alone goes
through the consumer's retry and dead-letter accounting (requeued, then handler_error after
max_attempts), its neighbours are settled as their outcomes say. A handler that raises fails every
delivery of the batch that way. Deliveries with unreadable properties never reach the handler
(bad_properties), as in `Consumer`. Everything else (reconnects, the cautious prefetch after a lost
connection, dead letters in a transaction, draining) is `Consumer`'s.
"""

from __future__ import annotations

import functools
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.amqp.consumer import Consumer, _Link, _Work
from shared.amqp.delivery import Delivery, Outcome
from shared.amqp.settings import AmqpSettings

log = logging.getLogger("fedmask.amqp")

BatchHandler = Callable[[list[Delivery]], Sequence["Outcome | BaseException"]]
DEFAULT_LINGER_S = 0.002  # a lone delivery waits this long for company: far below a handler's own time


def _no_single_handler(_d: Delivery) -> Outcome:
    raise TypeError("a BatchConsumer calls its batch handler only")


class BatchConsumer(Consumer):
    """See the module docstring. `after_batch`, if given, runs in the handler thread once a batch's
    settlements are handed to the connection thread (the aggregator closes rounds there, so the
    batch's acks do not wait for a merge)."""

    def __init__(self, settings: AmqpSettings, queue: str, handler: BatchHandler, *, batch_max: int | None = None,
                 linger: float = DEFAULT_LINGER_S, after_batch: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(settings, queue, _no_single_handler, **kwargs)
        self.batch_handler = handler
        self.batch_max = batch_max if batch_max is not None else max(1, self.prefetch // 2)
        if self.batch_max < 1 or linger < 0:
            raise ValueError("batch_max must be >= 1 and linger >= 0")
        self.linger = linger
        self.after_batch = after_batch
        self.batches = 0  # handler calls, for operators and the bench: deliveries / batches = mean size

    def _work_loop(self, stop: threading.Event) -> None:
        while True:
            first = self._work.get()
            if first is None:
                return
            self._busy.set()  # before anything else, so a drain never misses a delivery in hand
            try:
                batch, ended = self._collect(first)
                self._run_batch(stop, batch)
                if self.after_batch is not None:
                    try:
                        self.after_batch()
                    except Exception:  # the service reports its own failures; this one must not end the loop
                        log.exception("after_batch of %s failed", self.queue)
            finally:
                self._busy.clear()
            if ended:
                return

    def _collect(self, first: _Work) -> tuple[list[_Work], bool]:
        """`first` and what else is waiting (see the module docstring); True once the stop sentinel came."""
        batch = [first]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.batch_max:
            try:
                work = self._work.get_nowait()
            except queue_mod.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    work = self._work.get(timeout=left)
                except queue_mod.Empty:
                    break
            if work is None:
                return batch, True
            batch.append(work)
        return batch, False

    def _run_batch(self, stop: threading.Event, batch: list[_Work]) -> None:
        live = [w for w in batch if w.link.open and w.link.accepting]  # the rest: the broker redelivers them
        # Unreadable deliveries are settled before the handler runs: a connection lost while it runs
        # would otherwise bring them back, to be refused (and counted) again.
        self._schedule_by_link([(w, self._refuse(w)) for w in live if w.problem])
        settled: list[tuple[_Work, Outcome]] = []
        handled = [w for w in live if not w.problem]
        if handled:
            self.batches += 1
            results = self._call_batch([w.delivery for w in handled])
            for w, result in zip(handled, results, strict=True):
                settled.append((w, result if isinstance(result, Outcome) else self._failed(w.delivery, result)))
        if any(o.action == "requeue" for _, o in settled) and self.requeue_delay > 0:
            stop.wait(self.requeue_delay)  # an immediate requeue would spin on a failing dependency
        self._schedule_by_link(settled)

    def _schedule_by_link(self, settled: list[tuple[_Work, Outcome]]) -> None:
        by_link: dict[int, tuple[_Link, list[tuple[_Work, Outcome]]]] = {}
        for w, o in settled:
            by_link.setdefault(id(w.link), (w.link, []))[1].append((w, o))
        for link, pairs in by_link.values():
            self._schedule_all(link, pairs)

    def _call_batch(self, deliveries: list[Delivery]) -> list[Outcome | BaseException]:
        try:
            results = list(self.batch_handler(deliveries))
            if len(results) != len(deliveries):
                raise TypeError(f"batch handler returned {len(results)} results for {len(deliveries)} deliveries")
            for r in results:
                if not isinstance(r, (Outcome, BaseException)):
                    raise TypeError(f"batch handler returned {type(r).__name__}, not Outcome")
            return results
        except Exception as e:  # the handler itself failed: every delivery of the batch failed with it
            return [e] * len(deliveries)

    def _schedule_all(self, link: _Link, pairs: list[tuple[_Work, Outcome]]) -> None:
        if not link.open:
            log.info("dropped the settlement of %d deliveries: their connection is gone, the broker redelivers them",
                     len(pairs))
            return
        with self._pending_lock:
            self._pending += 1
        try:
            link.connection.add_callback_threadsafe(functools.partial(self._settle_all, link, pairs))
        except (pika.exceptions.AMQPError, OSError):
            with self._pending_lock:
                self._pending -= 1
            log.info("dropped the settlement of %d deliveries: their connection closed, the broker redelivers them",
                     len(pairs))
