"""Slow boards: a round closes on its quorum without them; their late updates follow the round's
policy (drop, or carry into a later round within a staleness bound); busy boards are not re-tasked.

Real Redis, in-memory downlink, a fake clock so deadlines are exact."""

from __future__ import annotations

import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore, StoreError
from shared import codec
from shared.data import FederatedDataset
from shared.presets import model_spec
from shared.transport import InMemoryTransport
from tests.integration.test_aggregator_core import SEED, TASK, WIDTH, _devices, _hello_all, _train_round, data

pytestmark = pytest.mark.services
__all__ = ["data"]  # a fixture, re-exported so pytest finds it here (store: conftest.py)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _setup(store: RoundStore, data: FederatedDataset):  # type: ignore[no-untyped-def]
    bus, clock = InMemoryTransport(), Clock()
    core = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head", clock=clock)
    devs = _devices(data)
    _hello_all(core, devs)
    return core, bus, clock, devs


def _masks(bus: InMemoryTransport, device: str) -> list[codec.Message]:
    return [m for m in (codec.decode(b) for b in bus.take_downlink(device)) if m.type == "mask"]


def test_quorum_closes_without_the_slow_device_and_drop_counts_it(store: RoundStore, data: FederatedDataset) -> None:
    core, bus, clock, devs = _setup(store, data)
    core.start_round(rate=1.0, quorum=0.75, deadline_s=300, seed=SEED)  # 3 of 4
    bodies = _train_round(core, bus, devs)
    *fast, slow = sorted(bodies)
    for d in fast:
        clock.t += 1.0
        assert core.handle(f"device.{d}.update", d, bodies[d]).action == "ack"
    info = store.info(1)
    assert info is not None and info.state == "closed"  # closed at the quorum, 297 s before the deadline
    assert info.closed_at is not None and info.closed_at - info.opened_at == pytest.approx(3.0)
    assert sorted(info.arrivals) == sorted(fast) and info.arrivals[fast[0]] == pytest.approx(1.0)
    clock.t += 60
    decision = core.handle(f"device.{slow}.update", slow, bodies[slow])
    assert (decision.action, decision.reason) == ("reject", "round_closed")
    after = store.info(1)
    assert after is not None and after.late == [slow] and slow not in after.received
    assert store.counters()["late:dropped"] == 1
    assert all(len(_masks(bus, d)) == 1 for d in fast) and not _masks(bus, slow)


def test_carry_merges_a_late_update_into_the_next_round(store: RoundStore, data: FederatedDataset) -> None:
    core, bus, _, devs = _setup(store, data)
    core.start_round(rate=1.0, quorum=0.75, deadline_s=300, seed=SEED, late="carry", max_staleness=2)
    bodies = _train_round(core, bus, devs)
    *fast, slow = sorted(bodies)
    for d in fast:
        core.handle(f"device.{d}.update", d, bodies[d])
    # The slow board is still training round 1, so round 2 does not task it.
    info2 = core.start_round(rate=1.0, quorum=1.0, deadline_s=300, seed=SEED, late="carry", max_staleness=2)
    assert sorted(info2.sampled) == sorted(fast)
    assert core.handle(f"device.{slow}.update", slow, bodies[slow]).action == "ack"  # carried, not dropped
    assert core.handle(f"device.{slow}.update", slow, bodies[slow]).action == "ack"  # redelivered: no-op
    info2 = store.info(2)
    assert info2 is not None and info2.carried == [slow] and slow not in info2.received and info2.state == "open"
    assert store.info(1).late == [slow]  # type: ignore[union-attr]  # still reported as late for round 1
    round2 = _train_round(core, bus, {d: devs[d] for d in fast})
    for d in fast:
        core.handle(f"device.{d}.update", d, round2[d])
    assert store.info(2).state == "closed"  # type: ignore[union-attr]
    slow_masks = _masks(bus, slow)
    assert [m.version for m in slow_masks] == [2]  # the carried board gets round 2's merged mask
    assert store.counters()["late:carried"] == 1 and "late:dropped" not in store.counters()


def test_carry_parks_until_the_next_round_and_respects_the_bound(store: RoundStore, data: FederatedDataset) -> None:
    core, bus, clock, devs = _setup(store, data)
    kw = {"rate": 1.0, "quorum": 0.6, "deadline_s": 300.0, "seed": SEED, "late": "carry", "max_staleness": 1}
    core.start_round(**kw)  # type: ignore[arg-type]  # quorum 3 of 4
    bodies = _train_round(core, bus, devs)
    *fast, slow = sorted(bodies)
    for d in fast:
        core.handle(f"device.{d}.update", d, bodies[d])
    # No newer round is open yet: the late update is parked, acked, and merged when round 2 opens;
    # its board sits round 2 out (it will get round 2's mask) instead of starting late again.
    assert core.handle(f"device.{slow}.update", slow, bodies[slow]).action == "ack"
    info2 = core.start_round(**kw)  # type: ignore[arg-type]  # quorum 2 of 3
    assert info2.carried == [slow] and sorted(info2.sampled) == sorted(fast)
    # Round 2 closes without one board, whose update then has to be carried into round 3.
    round2 = _train_round(core, bus, devs)
    late2 = sorted(round2)[0]
    for d in sorted(round2)[1:]:
        core.handle(f"device.{d}.update", d, round2[d])
    assert [m.version for m in _masks(bus, slow)] == [2]
    core.start_round(**kw)  # type: ignore[arg-type]  # round 3: late2 is busy (tasked 2, within 1)
    info3 = store.info(3)
    assert info3 is not None and late2 not in info3.sampled and slow in info3.sampled
    clock.t += 1
    assert core.handle(f"device.{late2}.update", late2, round2[late2]).action == "ack"  # carried into 3
    assert store.info(3).carried == [late2]  # type: ignore[union-attr]


def test_expired_parked_update_and_unknown_policy(store: RoundStore, data: FederatedDataset) -> None:
    core, bus, _, devs = _setup(store, data)
    kw = {"rate": 1.0, "quorum": 0.75, "deadline_s": 300.0, "seed": SEED, "late": "carry", "max_staleness": 1}
    core.start_round(**kw)  # type: ignore[arg-type]
    bodies = _train_round(core, bus, devs)
    *fast, slow = sorted(bodies)
    for d in fast:
        core.handle(f"device.{d}.update", d, bodies[d])
    core.handle(f"device.{slow}.update", slow, bodies[slow])  # parked for round 2
    # The operator opens round 2 under "drop": the parked update may not be merged, so it expires.
    core.start_round(**{**kw, "late": "drop"})  # type: ignore[arg-type]
    assert store.info(2).carried == [] and store.counters()["late:expired"] == 1  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="late policy"):
        core.start_round(**{**kw, "late": "keep"})  # type: ignore[arg-type]
