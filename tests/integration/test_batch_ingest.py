"""Batch ingest (aggregator/core_batch.py, aggregator/store_batch.py) on real Redis: each message of a
batch gets its own outcome; a bad one never fails its neighbours; nothing is acked that Redis does not
hold, also when Redis fails in the middle of the batch's pipeline."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from aggregator.core import AggregatorCore
from aggregator.service import AggregatorService
from aggregator.store import RoundStore, StoreError
from ops.fleet.emulated import BenchModel, EmulatedDevice, make_devices
from shared.amqp import AmqpSettings, Delivery, device_user
from shared.transport import InMemoryTransport

pytestmark = pytest.mark.services
N = 6


@pytest.fixture(scope="module")
def model() -> BenchModel:
    return BenchModel.for_params("activity", 20_000, 0)


def _core(store: RoundStore, model: BenchModel) -> tuple[AggregatorCore, dict[str, EmulatedDevice]]:
    core = AggregatorCore(store, InMemoryTransport(), model.spec)
    devs = make_devices([f"d{i}" for i in range(N)], model, 0)
    hellos = core.handle_batch([(f"device.{d}.hello", d, dev.hello()) for d, dev in devs.items()])
    assert [r.action for r in hellos.results] == ["ack"] * N  # type: ignore[union-attr]
    return core, devs


def _update(d: str, body: bytes) -> tuple[str, str, bytes]:
    return f"device.{d}.update", d, body


def test_a_mixed_batch_settles_each_message_by_its_own_outcome(store: RoundStore, model: BenchModel) -> None:
    core, devs = _core(store, model)
    r = core.start_round(devices=N - 1, quorum=1.0, deadline_s=60, seed=0, candidates=[f"d{i}" for i in range(N - 1)])
    sampled = r.sampled
    outsider = f"d{N - 1}"  # enrolled, not sampled in this round
    good = {d: devs[d].update(r.round_id) for d in sampled}
    batch = [
        _update(sampled[0], good[sampled[0]]),
        ("device.x.update", sampled[1], b"\x00garbage"),  # undecodable
        _update(sampled[0], good[sampled[0]]),  # a redelivery inside the same batch
        _update(outsider, devs[outsider].update(r.round_id)),  # not sampled
        (f"device.{sampled[1]}.update", sampled[2], good[sampled[1]]),  # sent by another board: spoofed
        _update(sampled[1], devs[sampled[1]].update(r.round_id, nbits=7)),  # wrong length
        (f"device.{sampled[2]}.hello", sampled[2], devs[sampled[2]].hello()),  # a hello between updates
        *[_update(d, good[d]) for d in sampled[1:]],  # the rest: the last one meets the quorum
    ]
    out = core.handle_batch(batch)
    actions = [(x.action, x.reason) for x in out.results]  # type: ignore[union-attr]
    assert actions[:7] == [("ack", ""), ("reject", "undecodable"), ("ack", ""), ("reject", "not_sampled"),
                           ("reject", "spoofed_device"), ("reject", "bad_length"), ("ack", "")]
    assert actions[7:] == [("ack", "")] * (N - 2)
    assert out.to_close == [r.round_id]  # elected once, by the quorum-meeting update; closed by the caller
    info = store.info(r.round_id)
    assert info is not None and info.state == "closing" and info.received == sorted(sampled)
    assert store.updates(r.round_id) == good  # each stored once, the first body of a device stands
    c = store.counters()
    assert c["updates:stored"] == N - 1 and c["updates:duplicate"] == 1
    assert {k: c[k] for k in c if k.startswith("rejected:")} == {
        "rejected:undecodable": 1, "rejected:not_sampled": 1, "rejected:spoofed_device": 1, "rejected:bad_length": 1}
    core.close(r.round_id)
    assert store.info(r.round_id).state == "closed"  # type: ignore[union-attr]


def test_a_batch_merges_as_one_by_one_ingest_does(store: RoundStore, model: BenchModel) -> None:
    """Same updates, once through handle() and once through handle_batch(): the same merged masks."""
    masks = []
    for batched in (False, True):
        prefix = store.prefix + ("b:" if batched else "s:")
        s = RoundStore(store.client, prefix=prefix)
        core, devs = _core(s, model)
        r = core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=0)
        items = [_update(d, devs[d].update(r.round_id)) for d in r.sampled]
        if batched:
            out = core.handle_batch(items)
            for rid in out.to_close:
                core.close(rid)
        else:
            for item in items:
                assert core.handle(*item).action == "ack"
        masks.append({d: s.mask(d) for d in r.sampled})
        for k in list(store.client.scan_iter(match=f"{prefix}*".encode())):
            store.client.delete(k)
    assert masks[0] == masks[1] and all(v is not None for v in masks[0].values())


class _FailingPipelines:
    """client.pipeline() whose execute() sends only the first `keep` commands, then raises
    ConnectionError, `times` times: Redis gone in the middle of a batch's round trip."""

    def __init__(self, client: redis.Redis, keep: int, times: int) -> None:
        self.client, self.keep, self.times = client, keep, times

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.client.__class__.pipeline(self.client, *args, **kwargs)
        if self.times <= 0:
            return pipe
        self.times -= 1
        real_execute, keep = pipe.execute, self.keep

        def execute(raise_on_error: bool = True) -> Any:
            pipe.command_stack = pipe.command_stack[:keep]
            real_execute(raise_on_error=raise_on_error)
            raise redis.ConnectionError("Connection reset by peer (injected mid-batch)")

        pipe.execute = execute
        return pipe


def test_redis_failing_mid_batch_acks_nothing_it_did_not_store(store: RoundStore, model: BenchModel) -> None:
    core, devs = _core(store, model)
    r = core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=0)
    items = [_update(d, devs[d].update(r.round_id)) for d in r.sampled]
    # 2 updates' commands (SET, admit, touch, close_round each) reach Redis, then the connection drops.
    store.client.pipeline = _FailingPipelines(store.client, keep=8, times=1)  # type: ignore[method-assign]
    with pytest.raises(StoreError) as err:
        core.handle_batch(items)
    assert err.value.retryable  # the service retries the batch; nothing of it has been acked
    assert sorted(store.updates(r.round_id)) == sorted(r.sampled[:2])
    out = core.handle_batch(items)  # the retry: the two stored ones are duplicates, acked; the rest stored
    assert [x.action for x in out.results] == ["ack"] * N  # type: ignore[union-attr]
    assert store.updates(r.round_id) == {d: b for _, d, b in items}
    c = store.counters()
    assert c["updates:stored"] == N and c["updates:duplicate"] == 2
    assert not list(store.client.scan_iter(match=f"{store.prefix}*incoming*".encode()))  # no body left behind


def test_the_service_retries_a_batch_in_place_and_acks_only_after_it_is_stored(store: RoundStore,
                                                                              model: BenchModel) -> None:
    core, devs = _core(store, model)
    r = core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=0)
    svc = AggregatorService.__new__(AggregatorService)  # on_batch only: no broker, no metrics server
    svc.core, svc.store, svc.lock, svc.stop = core, store, threading.Lock(), threading.Event()
    svc.amqp = AmqpSettings.from_url("amqp://guest:guest@127.0.0.1:5672/")
    svc._resume_pending, svc._to_close = False, []
    svc.metrics = type("M", (), {"received": lambda _self, _rk: None})()  # type: ignore[assignment]
    def deliveries(round_id: int) -> list[Delivery]:
        return [Delivery(f"device.{d}.update", device_user(d, svc.amqp.vhost), devs[d].update(round_id), {}, False, i)
                for i, d in enumerate(r.sampled)]

    store.client.pipeline = _FailingPipelines(store.client, keep=4, times=2)  # type: ignore[method-assign]
    outcomes = svc.on_batch(deliveries(r.round_id))
    assert [o.action for o in outcomes] == ["ack"] * N  # type: ignore[union-attr]
    assert sorted(store.updates(r.round_id)) == sorted(r.sampled)  # every acked update is in Redis
    assert svc._to_close == [r.round_id] and svc._resume_pending
    # Redis gone for good and the service draining: the batch is requeued, never acked.
    svc.close_elected()
    r2 = core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=0)
    store.client.pipeline = _FailingPipelines(store.client, keep=0, times=100)  # type: ignore[method-assign]
    svc.stop.set()
    outcomes = svc.on_batch(deliveries(r2.round_id))
    assert [o.action for o in outcomes] == ["requeue"] * N  # type: ignore[union-attr]
    assert store.updates(r2.round_id) == {}
