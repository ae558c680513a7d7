"""The aggregator's Prometheus metrics (prometheus_client), served over HTTP by the service.

Two sources, named apart in docs/metrics.md:
- The deployment's counters and state, read from Redis when Prometheus scrapes (StoreCollector).
  Round outcomes are decided in more than one process: the aggregator stores, refuses and carries
  updates as they arrive, but `round start` (or the demo's round driver) carries parked late updates
  into the round it opens and expires the stale ones. All of them count in the store's counters hash
  (`<p>counters`), so that hash is the one truth: it survives restarts, `round status --json` shows the
  same numbers, and reading it costs one HGETALL per scrape and nothing on the ingest path. Every
  aggregator process of a deployment reports the same values (aggregate them with max, not sum).
- This process's own: the uplink deliveries it received and the latency of the closes it ran (a
  histogram). With several aggregator processes, sum these across instances.

Nothing here may stop the pipeline: a scrape while Redis is down answers fedmask_redis_up 0, and a
failed latency read after a close is logged, not raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from aggregator.core import AggregatorCore
from aggregator.round_stats import mean_stats, round_stats
from aggregator.store import STATES, RoundInfo, RoundStore, StoreError
from shared import codec

log = logging.getLogger("fedmask.aggregator")

DEFAULT_METRICS_PORT: Final = 9811  # `fedmask aggregator run --metrics-port`; 0 disables the endpoint
DEFAULT_METRICS_HOST: Final = "127.0.0.1"  # the endpoint has no authentication: expose it deliberately
ALIVE_WINDOW_S: Final = 120.0  # a heartbeat within this window counts as alive (as `devices list` does)
CLOSE_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Every way a late update is counted (aggregator/core.py): carried into a later round, dropped, expired while
# parked, parked, or dropped at parking time because a newer one of the device's replaced it or was parked
# already (replaced, superseded). Always exported, so a dashboard never shows "no data".
LATE_OUTCOMES: Final = ("carried", "dropped", "expired", "parked", "replaced", "superseded")
ROUND_SETS: Final = ("sampled", "received", "carried", "late")
# Store counters with a family of their own; the rest are exported as fedmask_store_events{counter=...}.
_PLAIN: Final = {"updates:stored": ("fedmask_updates_stored", "updates persisted for the round they were sent for"),
                 "updates:duplicate": ("fedmask_updates_duplicate", "redelivered or repeated updates, already stored"),
                 "rounds:closed": ("fedmask_rounds_closed", "rounds closed (every merged mask published)")}


@dataclass(frozen=True)
class StoreSnapshot:
    """What one scrape read from Redis."""

    counters: dict[str, int]
    enrolled: int
    alive: int
    unreachable: int
    parked: int
    current: RoundInfo | None  # the newest round
    means: dict[str, float | None]  # round_stats.mean_stats of the newest closed round


class StoreCollector:
    """The deployment's counters, devices and current round, read from Redis at scrape time."""

    def __init__(self, store: RoundStore, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def describe(self) -> Iterator[Metric]:
        """The families (without samples), so the registry can refuse a name clash at registration."""
        yield _gauge("fedmask_redis_up", "", None)
        yield from _families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            snap: StoreSnapshot | None = self.read()
        except StoreError as err:
            log.warning("metrics scrape could not read Redis: %s", err)
            snap = None
        yield _gauge("fedmask_redis_up", "1 if this scrape could read the deployment's Redis", float(snap is not None))
        if snap is not None:
            yield from _families(snap)

    def read(self) -> StoreSnapshot:
        s = self.store
        current = s.current_round()
        info = s.info(current) if current is not None else None
        # The learning gauges describe the newest round that has closed (an open round is still filling).
        closed = (current or 0) if info is not None and info.state == "closed" else (current or 0) - 1
        with s._guard("metrics"):  # counts only: a scrape never lists a large fleet's ids
            enrolled = int(s.client.scard(s.keys.key("devices")))
            alive = int(s.client.zcount(s.keys.key("devices:alive"), self.clock() - ALIVE_WINDOW_S, "+inf"))
            parked = int(s.client.scard(s.keys.key("pending")))
        return StoreSnapshot(counters=s.counters(), enrolled=enrolled, alive=alive,
                             unreachable=s.unreachable_count(), parked=parked, current=info,
                             means=mean_stats(round_stats(s, closed)) if closed >= 1 else {})


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc)
    if value is not None:
        fam.add_metric([], value)
    return fam


def _families(snap: StoreSnapshot | None) -> Iterator[Metric]:
    """Every family StoreCollector exports; without samples when `snap` is None (describe)."""
    counters = snap.counters if snap else {}
    for key, (name, doc) in _PLAIN.items():
        fam = CounterMetricFamily(name, doc + " (deployment total, from Redis)")
        if snap:
            fam.add_metric([], counters.get(key, 0))
        yield fam
    rejected = CounterMetricFamily("fedmask_updates_rejected", "uplink messages dead-lettered, by reason "
                                   "(deployment total, from Redis)", labels=["reason"])
    late = CounterMetricFamily("fedmask_late_updates", "updates for a round that had closed, by outcome: carried "
                               "into a later round, dropped, expired while parked, parked, replaced or superseded "
                               "(deployment total, from Redis)", labels=["outcome"])
    other = CounterMetricFamily("fedmask_store_events", "every other counter of the store, by its name",
                                labels=["counter"])
    if snap:
        for outcome in LATE_OUTCOMES:
            late.add_metric([outcome], counters.get(f"late:{outcome}", 0))
        for key, value in counters.items():
            kind, _, rest = key.partition(":")
            if kind == "rejected" and rest:  # reasons are the code's own codes, never a device's text
                rejected.add_metric([rest], value)
            elif kind == "late" and rest and rest not in LATE_OUTCOMES:
                late.add_metric([rest], value)
            elif key not in _PLAIN and kind not in ("rejected", "late"):
                other.add_metric([key], value)
    yield from (rejected, late, other)
    yield _gauge("fedmask_devices_enrolled", "devices that said hello", snap.enrolled if snap else None)
    yield _gauge("fedmask_devices_alive", f"devices heard from within {ALIVE_WINDOW_S:.0f} s",
                 snap.alive if snap else None)
    yield _gauge("fedmask_devices_unreachable", "devices whose merged mask could not be delivered",
                 snap.unreachable if snap else None)
    yield _gauge("fedmask_late_updates_parked", "late updates waiting in Redis for the next round to carry them",
                 snap.parked if snap else None)
    info = snap.current if snap else None
    yield _gauge("fedmask_round_current", "id of the newest round (0: none opened yet)",
                 (info.round_id if info else 0) if snap else None)
    state = GaugeMetricFamily("fedmask_round_state", "1 for the newest round's state, 0 for the others",
                              labels=["state"])
    members = GaugeMetricFamily("fedmask_round_devices", "devices of the newest round, by set", labels=["set"])
    if snap:
        for st in STATES:
            state.add_metric([st], 1.0 if info is not None and info.state == st else 0.0)
        for part in ROUND_SETS:
            members.add_metric([part], len(getattr(info, part)) if info is not None else 0)
    yield from (state, members)
    means = snap.means if snap else {}
    for field, what in (("mean_train_loss", "training loss"), ("mean_train_accuracy", "training accuracy"),
                        ("mean_val_accuracy", "validation accuracy")):
        yield _gauge(f"fedmask_round_{field}", f"newest closed round: mean {what} its devices reported",
                     means.get(field))


class AggregatorMetrics:
    """One registry per service (not prometheus_client's global one), so tests can run several."""

    def __init__(self, store: RoundStore, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(store, clock))
        self.updates_received = Counter("fedmask_updates_received", "uplink deliveries this process received that "
                                        "are not hellos (updates, and anything else a device sent)",
                                        registry=self.registry)
        self.hellos_received = Counter("fedmask_hellos_received", "hello deliveries this process received",
                                       registry=self.registry)
        self.close_seconds = Histogram("fedmask_round_close_seconds", "rounds this process closed: closer elected "
                                       "-> last merged mask confirmed and the round marked closed",
                                       buckets=CLOSE_BUCKETS, registry=self.registry)
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    def received(self, routing_key: str) -> None:
        """Count one delivery by the kind its routing key (device.<id>.<kind>) names; untrusted, but only counted."""
        if routing_key.rsplit(".", 1)[-1] in ("hello", "shello"):  # FedMask's and a strategy board's
            self.hellos_received.inc()
        else:
            self.updates_received.inc()

    def observe_close(self, store: RoundStore, round_id: int) -> None:
        try:
            info = store.info(round_id)
        except StoreError as err:
            log.warning("close latency of round %d not recorded: %s", round_id, err)
            return
        if info is not None and info.close_seconds is not None:
            self.close_seconds.observe(max(0.0, info.close_seconds))

    def serve(self, host: str, port: int) -> int | None:
        """Serve /metrics on host:port in a daemon thread; returns the bound port (None when port is 0,
        or when the port cannot be bound: logged, since metrics must not keep the aggregator down)."""
        if port == 0:
            return None
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            log.error("metrics endpoint not started on %s:%d: %s", host, port, err)
            return None
        self._server, self._thread = server, thread
        bound: int = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None


class MeteredCore(AggregatorCore):
    """AggregatorCore that records each close's latency in `metrics` (set by the service)."""

    metrics: AggregatorMetrics | None = None

    def close(self, round_id: int) -> dict[str, codec.Message]:
        messages = super().close(round_id)
        if self.metrics is not None:
            self.metrics.observe_close(self.store, round_id)
        return messages
