"""`Consumer`: one queue consumed with manual acks; a handler turns each `Delivery` into an `Outcome`.

Threading. pika is not thread-safe. `Consumer` keeps its connection in the thread that calls `run`
and calls the handler in one worker thread, so a handler that trains for minutes never starves
heartbeats; the handler's `Outcome` is settled back on the connection thread through
`add_callback_threadsafe`, and only if the delivery's connection is still the live one (a tag from a
dead connection is dropped: the broker has already requeued it).

Dead letters. A rejected delivery must reach dead.letters once, with a machine-readable reason, and
leave the source queue. RabbitMQ's own dead-lettering cannot add headers, so the consumer channel
runs in AMQP transaction mode and a reject is `publish(fedmask.dead, headers x-reject-reason=...)`
plus `ack(original)` committed together: if the connection drops before the commit neither happens
and the broker redelivers the original, so a client crash can neither lose the message nor
dead-letter it twice. Acks and requeues are committed the same way, in batches: whatever settled
while the previous commit was in flight goes into the next one.
A device's consumer cannot write to fedmask.dead (its permissions allow fedmask.uplink only), so on
device queues a reject is a plain `nack(requeue=False)`: the queue's x-dead-letter-exchange moves it
to dead.letters with RabbitMQ's x-death headers (reason "rejected"), and the reason is logged.

Hostile properties (untrusted.py). Our connections decode content headers totally: properties pika
cannot read arrive as UndecodableProperties, and the consumer rejects that delivery with reason
bad_properties without calling the handler; a dead letter's headers are built from scratch, never
copied from the delivery. Rejections are logged through a RejectionLog (shared/log_safety.py): the
first of each reason per window in full, the rest counted, so a flood cannot flood the log.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue as queue_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.amqp.broker_topology import DEAD_EXCHANGE
from shared.amqp.connection import _amqp_errors, _close_quietly, _connect
from shared.amqp.delivery import Delivery, Outcome
from shared.amqp.settings import DEVICE_QUEUE_PREFIX, AmqpError, AmqpSettings
from shared.amqp.untrusted import (
    MAX_REASON_CHARS,
    REASON_HEADER,
    UndecodableProperties,
    dead_letter_properties,
    delivery_count,
    plain,
    text,
)
from shared.log_safety import RejectionLog, printable

log = logging.getLogger("fedmask.amqp")

__all__ = ["MAX_REASON_CHARS", "REASON_HEADER", "Consumer", "DeadLetterMode", "Delivery", "Outcome"]
BAD_PROPERTIES: Final = "bad_properties"  # the reason for a delivery whose properties could not be read
_MAX_UNCOMMITTED: Final = 64  # settlements per transaction at most (bounded by prefetch in practice)


@dataclass(eq=False)
class _Link:
    """One live connection of a consumer. `open` goes False, on the connection thread, before the
    connection is closed or abandoned; outcomes for its deliveries are then dropped."""

    connection: Any
    channel: Any
    open: bool = True
    accepting: bool = True  # False while draining: queued deliveries are left for redelivery
    uncommitted: int = 0  # settlements sent but not yet committed (connection thread only)
    cautious: int = 0  # settlements still to go at prefetch 1 before the full prefetch (see _serve)


@dataclass(frozen=True)
class _Work:
    link: _Link
    delivery: Delivery
    exchange: str
    properties: Any  # as received: maybe UndecodableProperties
    problem: str = ""  # set: the delivery is rejected with BAD_PROPERTIES, the handler never sees it


class _Cancelled(Exception):
    pass


DeadLetterMode = Literal["auto", "republish", "native"]


class Consumer:
    """Consume one queue with manual acks; see the module docstring for threading and dead letters.

    handler(delivery) -> Outcome runs in one worker thread, one delivery at a time, in delivery order.
    A handler that raises is retried (requeued after `requeue_delay`) and rejected with reason
    "handler_error" on its `max_attempts`-th failure; attempts are counted in process and, on quorum
    queues, from the broker's x-delivery-count. `dead_letter`: "republish" (reason header, needs
    write permission on fedmask.dead), "native" (nack without requeue), "auto" (native on device
    queues, republish elsewhere). `on_reject(reason)` is called (handler thread) for the rejections
    the consumer decides itself (bad_properties, handler_error), so the service can count them.
    """

    def __init__(
        self,
        settings: AmqpSettings,
        queue: str,
        handler: Callable[[Delivery], Outcome],
        *,
        prefetch: int | None = None,
        dead_letter: DeadLetterMode = "auto",
        max_attempts: int = 5,
        requeue_delay: float = 1.0,
        stop_grace: float = 30.0,
        max_backoff: float = 30.0,
        on_reject: Callable[[str], None] | None = None,
        log_window: float = 10.0,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch if prefetch is not None else settings.prefetch
        if dead_letter == "auto":
            dead_letter = "native" if queue.startswith(settings.namespace + DEVICE_QUEUE_PREFIX) else "republish"
        self.dead_letter: DeadLetterMode = dead_letter
        self.max_attempts = max_attempts
        self.requeue_delay = requeue_delay
        self.stop_grace = stop_grace
        self.max_backoff = max_backoff
        self.on_reject = on_reject
        self.rejections = RejectionLog(log, window=log_window)  # also rate-limits handler failures
        self.connections = 0  # successful connect+consume cycles; >1 means it reconnected
        self.opened = 0  # connections opened, also those lost before consuming began (a poison at the head)
        self.error: AmqpError | None = None  # set when start_in_thread's run ended on a fatal error
        self._work: queue_mod.Queue[_Work | None] = queue_mod.Queue()
        self._link: _Link | None = None
        self._ready = threading.Event()
        self._busy = threading.Event()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._consumed = False

    # -- lifecycle

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set. Reconnects with exponential backoff (capped at max_backoff) when
        the connection drops; raises AmqpError when the broker refuses the consumer outright (bad
        credentials, no read permission, no such queue)."""
        worker = threading.Thread(target=self._work_loop, args=(stop,), name=f"amqp-handler:{self.queue}", daemon=True)
        worker.start()
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    self._serve(stop)
                    continue  # graceful: stop is set
                except AmqpError as e:
                    if not e.retryable:
                        raise
                    problem, trace = str(e), False
                except Exception as e:  # a bug must not kill the service's only consumer
                    problem, trace = f"unexpected {type(e).__name__}: {e}", True
                if self._consumed:
                    backoff = 0.5  # it worked for a while: start the backoff over
                log.warning("consumer of %s: %s; reconnecting in %.1f s", self.queue, problem, backoff, exc_info=trace)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        finally:
            self._work.put(None)
            worker.join(timeout=self.stop_grace)

    def start_in_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError("consumer already started")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_capturing, args=(self._stop,),
                                        name=f"amqp-consumer:{self.queue}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once consuming has started; raises the fatal error if the consumer gave up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if self._ready.wait(0.05):
                return True
        return False

    def stop(self, timeout: float | None = None) -> None:
        """Stop a consumer started with start_in_thread: finish the delivery in hand, settle it, close."""
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout if timeout is not None else self.stop_grace + 5)
        self._thread, self._stop = None, None

    def _run_capturing(self, stop: threading.Event) -> None:
        try:
            self.run(stop)
        except AmqpError as e:
            self.error = e
            log.error("consumer of %s gave up: %s", self.queue, e)

    # -- connection thread

    def _serve(self, stop: threading.Event) -> None:
        """One connection's life: returns after a graceful stop, raises AmqpError otherwise."""
        self._consumed = False
        # After a lost connection only one delivery is in flight until `prefetch` have settled. If what
        # killed the connection was a message (a poison our decoder does not know yet), each time it
        # kills the connection again it is the only delivery returned, and the queue's delivery limit
        # retires it alone: at full prefetch every reconnect would also count against the honest
        # updates delivered beside it (issue 10; tests/faults/test_hostile_board.py).
        cautious = self.prefetch if self.opened and self.prefetch > 1 else 0
        connection = _connect(self.settings, f"consumer:{self.queue}")
        self.opened += 1
        link: _Link | None = None
        try:
            with _amqp_errors(f"consume {self.queue}", self.settings.redacted()):
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1 if cautious else self.prefetch)
                channel.tx_select()
                # The broker took us: a failure from here on (a delivery that arrives during
                # basic_consume and drops the connection) starts the backoff over, as later ones do.
                self._consumed = True
                link = _Link(connection, channel, cautious=cautious)
                channel.add_on_cancel_callback(self._on_cancel)
                channel.basic_consume(self.queue, functools.partial(self._on_message, link), auto_ack=False)
            self._link = link
            self.connections += 1
            self._ready.set()
            log.info("consuming %s on %s (prefetch %d)", self.queue, self.settings.redacted(), self.prefetch)
            # From here on every failure is the connection's, whatever the reply code (406 is also how
            # RabbitMQ reports consumer_timeout): reconnect.
            with _amqp_errors(f"consume {self.queue}", self.settings.redacted(), retryable=True):
                while not stop.is_set():
                    connection.process_data_events(time_limit=0.25)
                self._drain(link)
        except _Cancelled:
            raise AmqpError(f"consumer of {self.queue} was cancelled by the broker (queue deleted?)",
                            retryable=True) from None
        finally:
            self._ready.clear()
            if link is not None:
                link.open = False
                link.accepting = False
            self._link = None
            _close_quietly(connection)

    def _drain(self, link: _Link) -> None:
        """Graceful stop: no new deliveries, let the one in hand finish and settle, leave the rest
        unacked (closing the channel returns them to the queue)."""
        link.accepting = False
        for tag in list(link.channel.consumer_tags):
            link.channel.basic_cancel(tag)
        deadline = time.monotonic() + self.stop_grace
        while (self._busy.is_set() or self._pending) and time.monotonic() < deadline:
            link.connection.process_data_events(time_limit=0.05)

    def _on_cancel(self, _frame: Any) -> None:
        raise _Cancelled()

    def _on_message(self, link: _Link, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """Runs in pika's I/O loop, so it must not raise: whatever it cannot read becomes a problem."""
        problem = properties.problem if isinstance(properties, UndecodableProperties) else ""
        try:
            headers = {} if problem else plain(properties.headers or {})
            user_id = properties.user_id if isinstance(properties.user_id, str) else None
        except Exception as exc:  # a header pika decoded into something plain() cannot walk
            headers, user_id, problem = {}, None, f"unreadable headers ({type(exc).__name__})"
        delivery = Delivery(
            routing_key=text(method.routing_key),
            user_id=user_id,
            body=body,
            headers=headers,
            redelivered=bool(method.redelivered),
            delivery_tag=int(method.delivery_tag),
        )
        self._work.put(_Work(link, delivery, text(method.exchange), properties, problem))

    def _settle(self, work: _Work, outcome: Outcome) -> None:
        """Runs on the connection thread. Settlements are committed in batches: the commit is sent
        when no other settlement is waiting (or after _MAX_UNCOMMITTED). A batch is still all or
        nothing, and every update it acks was persisted before its Outcome existed; if the connection
        drops before the commit, the broker redelivers the batch and the idempotent store acks the
        repeats. One commit per message cost a broker round trip each (docs/results.md)."""
        self._settle_all(work.link, [(work, outcome)])

    def _settle_all(self, link: _Link, settled: list[tuple[_Work, Outcome]]) -> None:
        """Settle deliveries of one link (connection thread), then commit as `_settle` says."""
        try:
            for work, outcome in settled:
                self._settle_one(work, outcome)
        finally:
            with self._pending_lock:
                self._pending -= 1
                last = self._pending == 0
        if link.uncommitted and (last or link.uncommitted >= _MAX_UNCOMMITTED) and link.channel.is_open:
            link.channel.tx_commit()
            link.uncommitted = 0
        if link.cautious and link.channel.is_open:
            link.cautious = max(0, link.cautious - len(settled))
            if not link.cautious:
                link.channel.basic_qos(prefetch_count=self.prefetch)

    def _settle_one(self, work: _Work, outcome: Outcome) -> None:
        link = work.link
        tag = work.delivery.delivery_tag
        if link is not self._link or not link.open or not link.channel.is_open:
            log.info("dropped the %s of delivery %d: its connection is gone, the broker redelivers it",
                     outcome.action, tag)
            return
        channel = link.channel
        if outcome.action == "ack":
            channel.basic_ack(tag)
        elif outcome.action == "requeue":
            channel.basic_nack(tag, requeue=True)
        elif self.dead_letter == "republish":
            channel.basic_publish(self.settings.namespace + DEAD_EXCHANGE, work.delivery.routing_key,
                                  work.delivery.body, self._dead_properties(work, outcome.reason))
            channel.basic_ack(tag)
        else:
            self.rejections.note(outcome.reason, f"delivery {printable(work.delivery.routing_key)} "
                                                 f"from {self.queue}, to dead.letters by the queue")
            channel.basic_nack(tag, requeue=False)
        link.uncommitted += 1

    def _dead_properties(self, work: _Work, reason: str) -> Any:
        return dead_letter_properties(reason=reason, exchange=work.exchange, routing_key=work.delivery.routing_key,
                                      queue=self.queue, rejected_by=self.settings.username,
                                      received=work.properties, headers=work.delivery.headers)

    # -- worker thread

    def _work_loop(self, stop: threading.Event) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            self._busy.set()  # before the accepting check, so a drain never misses a delivery in hand
            try:
                if not (work.link.open and work.link.accepting):
                    continue  # from a dead or draining connection: the broker redelivers it
                outcome = self._refuse(work) if work.problem else self._call_handler(work.delivery)
                if outcome.action == "requeue" and self.requeue_delay > 0:
                    stop.wait(self.requeue_delay)  # an immediate requeue would spin on a failing dependency
                self._schedule(work, outcome)
            finally:
                self._busy.clear()

    def _refuse(self, work: _Work) -> Outcome:
        """A delivery whose properties could not be read: dead-lettered without calling the handler."""
        self.rejections.note(BAD_PROPERTIES, f"{printable(work.delivery.routing_key)}: {printable(work.problem)}")
        self._rejected(BAD_PROPERTIES)
        return Outcome.reject(BAD_PROPERTIES)

    def _rejected(self, reason: str) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(reason)
            except Exception:  # counting must never decide a delivery's fate
                log.warning("on_reject(%s) failed", reason, exc_info=True)

    def _call_handler(self, delivery: Delivery) -> Outcome:
        try:
            outcome = self.handler(delivery)
            if not isinstance(outcome, Outcome):
                raise TypeError(f"handler returned {type(outcome).__name__}, not Outcome")
            return outcome
        except Exception as e:
            return self._failed(delivery, e)

    def _failed(self, delivery: Delivery, e: BaseException) -> Outcome:
        """The handler failed on `delivery` with `e`: requeue it, or reject it (handler_error) on its
        max_attempts-th failure."""
        key = hashlib.sha256(delivery.routing_key.encode(errors="backslashreplace") + b"\0"
                             + delivery.body).hexdigest()
        attempts = self._failures.pop(key, 0) + 1
        count = delivery_count(delivery.headers)
        if count is not None:
            attempts = max(attempts, count + 1)
        where = printable(delivery.routing_key)
        if attempts >= self.max_attempts:
            # A traceback only with the line the rate limit lets through: a flood must not write one each.
            self.rejections.note("handler_error", f"handler failed on {where} (attempt {attempts}): "
                                                  f"{type(e).__name__}: {printable(str(e))}", exc_info=e)
            self._rejected("handler_error")
            return Outcome.reject("handler_error")
        self._failures[key] = attempts
        while len(self._failures) > 1024:
            self._failures.popitem(last=False)
        self.rejections.note("handler_retry", f"handler failed on {where} (attempt {attempts} of "
                                              f"{self.max_attempts}): {type(e).__name__}: {printable(str(e))}")
        return Outcome.requeue()

    def _schedule(self, work: _Work, outcome: Outcome) -> None:
        link = work.link
        if not link.open:
            log.info("dropped the %s of delivery %d: its connection is gone, the broker redelivers it",
                     outcome.action, work.delivery.delivery_tag)
            return
        with self._pending_lock:
            self._pending += 1
        try:
            link.connection.add_callback_threadsafe(functools.partial(self._settle, work, outcome))
        except (pika.exceptions.AMQPError, OSError):
            with self._pending_lock:
                self._pending -= 1
            log.info("dropped the %s of delivery %d: its connection closed, the broker redelivers it",
                     outcome.action, work.delivery.delivery_tag)
