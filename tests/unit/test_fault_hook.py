"""The aggregator's fault-injection switch (FEDMASK_FAULT) and its riding out of an unreachable Redis,
without services: tests/faults/test_crashes.py exercises both on the real pipeline."""

from __future__ import annotations

import socket
import threading

import pytest

from aggregator.core import ACK, Decision, fault_plan
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService, ServiceSettings
from aggregator.store import RoundStore, StoreError
from shared.amqp import AmqpSettings, Delivery
from shared.errors import ConfigError


def test_fault_plan_parses_point_and_count() -> None:
    assert fault_plan(None) is None and fault_plan("") is None
    assert fault_plan("merging") == ("merging", 1)
    assert fault_plan("published:3") == ("published", 3)
    for bad in ("nowhere", "stored:0", "stored:x", "stored:-1"):
        with pytest.raises(ConfigError):
            fault_plan(bad)


def test_unreachable_redis_is_retryable_and_a_broken_rule_is_not() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RoundStore.from_url(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StoreError) as down:
        store.current_round()
    assert down.value.retryable
    with pytest.raises(StoreError) as refused:
        store.open_round(1, sampled=[], deadline=1.0, quorum=1, now=0.0)  # checked before Redis is asked
    assert not refused.value.retryable


class _FlakyCore:
    """Stands in for AggregatorCore: handle() fails `failures` times as an unreachable Redis would."""

    def __init__(self, failures: int, *, retryable: bool = True) -> None:
        self.failures, self.retryable, self.calls, self.resumed = failures, retryable, 0, 0

    def handle(self, routing_key: str, user_id: str | None, body: bytes) -> Decision:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError("redis ingest_update failed: ConnectionError", retryable=self.retryable)
        return ACK

    def tick(self) -> None:
        self.handle("", None, b"")

    def resume(self) -> list[int]:
        self.resumed += 1
        return []


def _service(core: _FlakyCore) -> AggregatorService:
    svc = AggregatorService.__new__(AggregatorService)  # no broker or Redis connections
    svc.settings = ServiceSettings(amqp_url="amqp://127.0.0.1/", redis_url="redis://127.0.0.1/0")
    svc.amqp = AmqpSettings.from_url(svc.settings.amqp_url)  # on_delivery maps user_id to a device of its vhost
    svc.core, svc.lock, svc.stop, svc._resume_pending = core, threading.Lock(), threading.Event(), False  # type: ignore[assignment]
    svc.metrics = AggregatorMetrics(RoundStore.from_url(svc.settings.redis_url))  # counting touches no Redis
    return svc


DELIVERY = Delivery("device.d.update", "%2F.d", b"", {}, False, 1)


def test_a_delivery_waits_for_redis_instead_of_failing() -> None:
    svc = _service(_FlakyCore(failures=1))
    assert svc.on_delivery(DELIVERY).action == "ack"
    assert svc.core.calls == 2 and svc._resume_pending  # type: ignore[attr-defined]
    assert svc.metrics.updates_received._value.get() == 1  # one delivery, counted once across its retries


def test_a_drain_during_the_wait_requeues_and_a_broken_rule_still_raises() -> None:
    svc = _service(_FlakyCore(failures=10))
    svc.stop.set()
    assert svc.on_delivery(DELIVERY).action == "requeue"
    with pytest.raises(StoreError):
        _service(_FlakyCore(failures=1, retryable=False)).on_delivery(DELIVERY)


def test_a_tick_survives_redis_and_then_finishes_an_interrupted_close() -> None:
    core = _FlakyCore(failures=1)
    svc = _service(core)
    svc._tick()  # Redis down: logged, not raised
    assert svc._resume_pending and core.resumed == 0
    svc._tick()
    assert core.resumed == 1 and not svc._resume_pending
