"""The aggregator process: consume aggregator.uplink, persist, close rounds, publish masks.

One lock serialises the consumer's handler thread and the deadline ticker, so the round logic
(AggregatorCore) and the single downlink Publisher are never used by two threads at once.
SIGTERM drains: the consumer stops taking deliveries; nothing is acked before it is persisted.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from aggregator.core_strategy import config_fields
from aggregator.dropped_tally import DroppedTally
from aggregator.metrics import DEFAULT_METRICS_HOST, AggregatorMetrics, MeteredCore
from aggregator.store import RoundStore, StoreError, redact_url
from aggregator.store_closer import DEFAULT_LEASE_S, default_closer_id
from aggregator.store_durability import require_ack_durability
from shared.amqp import (
    AGGREGATOR_QUEUE,
    DROPPED_QUEUE,
    AmqpError,
    AmqpSettings,
    BatchConsumer,
    Consumer,
    Delivery,
    Outcome,
    PublisherPool,
    device_of_user,
)
from shared.errors import ConfigError, FedMaskError
from shared.log_safety import printable
from shared.strategy_setup import strategy_setup
from shared.variant_setup import PRESET_VARIANT, variant_setup

log = logging.getLogger("fedmask.aggregator")
DOWNLINK_CONNECTIONS = 4  # shared.amqp.PublisherPool: confirmed downlinks in flight during a close
RETRY_MAX_SECONDS = 30.0  # the longest wait between two tries while Redis or the broker is unreachable


@dataclass(frozen=True)
class ServiceSettings:
    amqp_url: str
    redis_url: str
    task: str = "activity"
    width: int | None = None
    seed: int = 0
    variant: str = PRESET_VARIANT  # shared/variant_setup.py: model, merge rule and pruned layers
    merge: str | None = None       # the preset variant's rule (None: its default); a named variant has its own
    prefetch: int = 16
    batch_max: int = 0  # deliveries per batch at most (aggregator/core_batch.py); 0 = half the prefetch
    tick_seconds: float = 0.5
    redis_prefix: str = "fm:"  # RoundStore key prefix: lets two aggregators (or a test) share one Redis db
    close_lease_s: float = DEFAULT_LEASE_S  # several aggregators on one queue: see aggregator/store_closer.py
    closer_id: str = ""  # unique among the aggregators sharing the queue; "" = host:pid
    ack_durability: str = "fsync"  # aggregator/store_durability.py: refuse a Redis that acks before fsync
    # Prometheus endpoint (aggregator/metrics.py). 0 here: a service built in code serves none unless
    # asked; `fedmask aggregator run` defaults to DEFAULT_METRICS_PORT.
    metrics_port: int = 0
    metrics_host: str = DEFAULT_METRICS_HOST
    # `--mode async` (aggregator/core_async.py): no rounds, a flush every `buffer` stored updates.
    mode: str = "rounds"
    buffer: int = 3
    max_staleness: int = 10
    staleness: str = "constant"
    replay_keep: int = 1000  # the async replay log's bound in updates (aggregator/store_async.py)
    # `--strategy S` (aggregator/core_strategy_rounds.py): a weight-training strategy instead of FedMask.
    strategy: str = ""
    planned_rounds: int | None = None  # the strategy's planned run length (FedDST's annealing); None: preset


class AggregatorService:
    def __init__(self, s: ServiceSettings) -> None:
        self.settings = s
        if s.strategy and (s.mode != "rounds" or s.variant != PRESET_VARIANT or s.merge is not None):
            raise ConfigError("--strategy runs its own rounds and settings: drop --mode async, --variant and --merge")
        # Before connecting: a bad variant or strategy fails without touching the services.
        self.setup = None if s.strategy else variant_setup(s.task, s.variant, width=s.width, seed=s.seed,
                                                           merge=s.merge)
        self.strategy_setup = strategy_setup(s.task, s.strategy, width=s.width, seed=s.seed,
                                             rounds=s.planned_rounds) if s.strategy else None
        self.amqp = AmqpSettings.from_url(s.amqp_url, prefetch=s.prefetch)
        self.store = RoundStore.from_url(s.redis_url, prefix=s.redis_prefix)
        # A close publishes one confirmed mask per participant: a few connections keep several in flight.
        self.publisher = PublisherPool(self.amqp, size=DOWNLINK_CONNECTIONS, declare=True)
        self.core = self._core()
        self.store.set_closer(s.closer_id or default_closer_id(), s.close_lease_s)
        self.metrics = self.core.metrics = AggregatorMetrics(self.store)
        self.metrics_port: int | None = None  # the bound port once run() serves metrics
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # Set when Redis or the broker failed under us: that may have cut a close short, leaving its
        # round in 'closing', which only resume() finishes. The next tick that reaches Redis runs it.
        self._resume_pending = False
        self.consumer: BatchConsumer | Consumer | None = None  # the uplink consumer, once run() has started it
        self._to_close: list[int] = []  # rounds a batch elected this process to close (after its acks)

    def _core(self) -> MeteredCore:
        s = self.settings
        if self.strategy_setup is not None:
            from aggregator.core_strategy_rounds import StrategyRoundsCore

            class MeteredStrategyCore(MeteredCore, StrategyRoundsCore):
                pass
            return MeteredStrategyCore(self.store, self.publisher, self.strategy_setup, seed=s.seed)
        assert self.setup is not None
        core_kw: dict[str, Any] = {"merge": self.setup.merge, "prune_last_k": self.setup.fedmask.prune_last_k,
                                   "prune_rho": self.setup.fedmask.prune_rho}
        if s.mode == "rounds":
            return MeteredCore(self.store, self.publisher, self.setup.spec, **core_kw)
        return async_core(self.store, self.publisher, self.setup.spec, s, core_kw)

    def served_config(self) -> dict[str, str]:
        """fm:config's description of what this aggregator serves: `round start` rebuilds the model
        from it, `round status` shows it to operators, and boards are checked against its fingerprint."""
        s = self.settings
        base = {"task": s.task, "width": "" if s.width is None else str(s.width), "seed": str(s.seed),
                "fingerprint": self.core.fingerprint, "amqp_address": self.amqp.address()}
        if self.strategy_setup is not None:
            st = self.strategy_setup
            return {**base, **config_fields(st.name, st.cfg), "variant": st.name, "merge": "", "upload": "",
                    "config_origin": st.origin, "planned_rounds": str(st.rounds), "mode": "rounds"}
        assert self.setup is not None
        return {**base, "variant": self.setup.variant, "merge": self.setup.merge, "upload": self.setup.upload,
                "config_origin": self.setup.origin, **mode_config(s)}

    def describe(self) -> str:
        what: str = (self.strategy_setup or self.setup).describe()  # type: ignore[union-attr]
        stream = getattr(self.core, "describe_stream", None)  # async mode: what a flush buffers and sends
        return f"{what}; {stream()}" if stream is not None else what

    def on_delivery(self, d: Delivery) -> Outcome:
        """While Redis (or the downlink) is unreachable, retry the delivery in place with backoff rather
        than fail it: a failed delivery is requeued and dead-lettered after the consumer's max_attempts,
        which would lose an update to an outage. handle() is idempotent, and nothing is acked before it
        returns; a drain (SIGTERM) during the wait requeues the delivery for the next aggregator."""
        self.metrics.received(d.routing_key)  # once per delivery, not per retry below
        delay = 0.5
        while True:
            try:
                with self.lock:
                    # Only a device user of this vhost speaks for a device (shared.amqp.device_user); anyone
                    # else maps to None, which the core rejects as spoofed_device.
                    decision = self.core.handle(d.routing_key, device_of_user(d.user_id, self.amqp.vhost), d.body)
                return Outcome.ack() if decision.action == "ack" else Outcome.reject(decision.reason)
            except (StoreError, AmqpError) as err:
                if not err.retryable:
                    raise
                self._resume_pending = True
                log.warning("%s not handled (%s); retrying in %.1f s", printable(d.routing_key), err, delay)
            if self.stop.wait(delay):
                return Outcome.requeue()
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def on_batch(self, ds: list[Delivery]) -> list[Outcome | BaseException]:
        """A prefetch window as one batch (aggregator/core_batch.py): one Redis round trip stores its
        updates, and each delivery gets its own outcome; nothing is acked before the batch's round trip
        has returned. An unreachable Redis (or broker) retries the whole batch in place, as on_delivery
        does for one: the retry is idempotent, its stored updates come back as duplicates and are acked."""
        for d in ds:
            self.metrics.received(d.routing_key)  # once per delivery, not per retry below
        items = [(d.routing_key, device_of_user(d.user_id, self.amqp.vhost), d.body) for d in ds]
        delay = 0.5
        while True:
            try:
                with self.lock:
                    batch = self.core.handle_batch(items)
                self._to_close.extend(r for r in batch.to_close if r not in self._to_close)
                return [r if isinstance(r, BaseException) else
                        Outcome.ack() if r.action == "ack" else Outcome.reject(r.reason) for r in batch.results]
            except (StoreError, AmqpError) as err:
                if not err.retryable:
                    raise
                self._resume_pending = True
                log.warning("a batch of %d not handled (%s); retrying in %.1f s", len(ds), err, delay)
            if self.stop.wait(delay):
                return [Outcome.requeue() for _ in ds]
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def close_elected(self) -> None:
        """Close the rounds the last batch elected (the consumer calls this once the batch's settlements
        are on their way). A close cut short by an outage is left to the ticker's resume."""
        while self._to_close:
            r = self._to_close.pop(0)
            try:
                with self.lock:
                    self.core.close(r)
            except Exception as err:
                self._resume_pending = True  # the round is 'closing' in Redis: resume() finishes it
                if not (isinstance(err, (StoreError, AmqpError)) and err.retryable):
                    raise
                log.warning("close of round %d cut short (%s); the ticker resumes it", r, err)

    def _tick(self) -> None:
        """Finish a close an outage cut short, then close the current round if its deadline passed. An
        unreachable Redis or broker is logged and retried at the next tick instead of ending the service."""
        try:
            with self.lock:
                if self._resume_pending:
                    self.core.resume()
                    self._resume_pending = False
                self.core.tick()
        except (StoreError, AmqpError) as err:
            if not err.retryable:
                raise
            self._resume_pending = True
            log.warning("tick failed (%s); retrying in %.1f s", err, self.settings.tick_seconds)

    def run(self) -> None:
        self.store.ping()
        s = self.settings
        durability = self.store.ack_durability()  # before the first ack: refuses a Redis that would lose acked updates
        require_ack_durability(durability, s.ack_durability, redact_url(s.redis_url))
        self.store.set_config({**self.served_config(), "ack_durability": durability.describe()})
        with self.lock:
            resumed = self.core.resume()
        if resumed:
            log.warning("resumed closing rounds %s", resumed)
        self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        consumer = self.uplink_consumer()
        self.consumer = consumer  # for operators' and tests' eyes: connections, rejections
        consumer.start_in_thread()
        # What the bounded dead.letters pushes out is counted (aggregator/dropped_tally.py); own thread, no lock.
        tally = Consumer(self.amqp, DROPPED_QUEUE, DroppedTally(self.store, self.stop).on_delivery, prefetch=64)
        tally.start_in_thread()
        log.info("aggregator up: task %s, model %s, %s, amqp %s", self.settings.task,
                 self.core.fingerprint, self.describe(), self.amqp.redacted())
        try:
            while not self.stop.wait(self.settings.tick_seconds):
                if consumer.error is not None:  # the broker refused us (credentials, permissions): stop loudly
                    raise FedMaskError(f"uplink consumer failed: {consumer.error}")
                self._tick()
                self.core.rejections.flush()  # the summaries of rejections kept out of the log
                consumer.rejections.flush()
        finally:
            consumer.stop()
            tally.stop()
            self.publisher.close()
            self.metrics.shutdown()
            log.info("aggregator stopped")

    def uplink_consumer(self) -> BatchConsumer | Consumer:
        """The consumer of aggregator.uplink: batches of the prefetch window (on_batch), the elected
        closes after each batch's acks. Its own rejections (unreadable properties, a delivery the handler
        keeps failing on) are counted beside the core's, as rejected:<reason>."""
        s = self.settings
        if s.mode == "async" or s.strategy:  # one at a time: each may flush (or fold), reading what it stored
            return Consumer(self.amqp, AGGREGATOR_QUEUE, self.on_delivery, prefetch=s.prefetch,
                            on_reject=lambda reason: self.store.incr(f"rejected:{reason}"))
        return BatchConsumer(self.amqp, AGGREGATOR_QUEUE, self.on_batch, prefetch=s.prefetch,
                             batch_max=s.batch_max or None, after_batch=self.close_elected,
                             on_reject=lambda reason: self.store.incr(f"rejected:{reason}"))

    def install_signal_handlers(self) -> None:
        def _drain(signum: int, _frame: object) -> None:
            log.info("signal %d: draining", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, _drain)
        signal.signal(signal.SIGINT, _drain)


def async_core(store: RoundStore, publisher: PublisherPool, spec: object, s: ServiceSettings,
               core_kw: dict[str, Any]) -> MeteredCore:
    from aggregator.core_async import AsyncCore  # only async mode loads it

    class MeteredAsyncCore(AsyncCore, MeteredCore):
        pass
    return MeteredAsyncCore(store, publisher, spec, buffer_k=s.buffer, max_staleness=s.max_staleness,
                            staleness=s.staleness, replay_keep=s.replay_keep, **core_kw)


def mode_config(s: ServiceSettings) -> dict[str, str]:
    """fm:config's mode fields: `round status` / `watch` show them, `round start` refuses async."""
    if s.mode == "rounds":
        return {"mode": "rounds"}
    return {"mode": s.mode, "buffer": str(s.buffer), "max_staleness": str(s.max_staleness), "staleness": s.staleness}
