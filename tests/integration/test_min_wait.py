"""A round's minimum wait (policy min_wait) in close_round.lua on real Redis, against the pure rule
shared.rounds.quorum_members: the quorum closes the round no earlier than opened_at + min_wait,
the deadline still closes it, and a round without the key closes on its quorum as before."""

from __future__ import annotations

import pytest

from aggregator.store import RoundStore
from shared.rounds import quorum_members

pytestmark = pytest.mark.services
T0 = 1_700_000_000.0


def _open(store: RoundStore, policy: dict[str, object], *, deadline: float = 60.0) -> None:
    store.open_round(1, sampled=["a", "b", "c"], deadline=T0 + deadline, quorum=2, now=T0, policy=policy)


def test_quorum_waits_for_the_minimum_wait(store: RoundStore) -> None:
    _open(store, {"min_wait": 5.0})
    assert store.ingest_update(1, "a", b"ua", T0 + 0.1) == ("stored", False)
    assert store.ingest_update(1, "b", b"ub", T0 + 0.2) == ("stored", False)  # quorum met, wait not over
    assert not store.try_close(1, T0 + 4.9)
    assert store.ingest_update(1, "c", b"uc", T0 + 3.0) == ("stored", False)  # inside the wait: merged too
    assert store.try_close(1, T0 + 5.0)  # the ticker's call once the wait is over
    info = store.info(1)
    assert info is not None and info.state == "closing" and info.received == ["a", "b", "c"]
    assert quorum_members({"a": 0.1, "b": 0.2, "c": 3.0}, 2, min_wait=5.0) == {"a", "b", "c"}


def test_without_a_minimum_wait_the_quorum_closes_at_once(store: RoundStore) -> None:
    _open(store, {"quorum": 0.6})
    assert store.ingest_update(1, "a", b"ua", T0 + 0.1) == ("stored", False)
    assert store.ingest_update(1, "b", b"ub", T0 + 0.2) == ("stored", True)
    assert store.ingest_update(1, "c", b"uc", T0 + 3.0)[0] == "closed"  # late: the round is closing
    assert quorum_members({"a": 0.1, "b": 0.2, "c": 3.0}, 2) == {"a", "b"}


def test_the_deadline_still_closes_a_round_inside_its_wait(store: RoundStore) -> None:
    _open(store, {"min_wait": 30.0}, deadline=10.0)
    assert store.ingest_update(1, "a", b"ua", T0 + 0.1) == ("stored", False)
    assert not store.try_close(1, T0 + 9.9)
    assert store.try_close(1, T0 + 10.0)
    assert quorum_members({"a": 0.1, "b": 12.0}, 2, min_wait=30.0, deadline=10.0) == {"a"}


def test_a_malformed_policy_means_no_wait(store: RoundStore) -> None:
    store.open_round(1, sampled=["a", "b"], deadline=T0 + 60, quorum=1, now=T0, policy={"min_wait": "soon"})
    assert store.ingest_update(1, "a", b"ua", T0 + 0.1) == ("stored", True)


def test_the_service_opens_rounds_with_the_wait_and_its_ticker_closes_them(store: RoundStore) -> None:
    from aggregator.core import AggregatorCore
    from aggregator.store import StoreError
    from shared.transport import InMemoryTransport
    from tests import membership_cases as membership

    now = [T0]
    core = AggregatorCore(store, InMemoryTransport(), membership.SPEC, merge="head", clock=lambda: now[0])
    m = membership.model()
    for d in ("a", "b", "c"):
        assert core.handle(f"device.{d}.hello", d, membership.hello(d, m)).action == "ack"
    with pytest.raises(StoreError, match="min_wait"):
        core.start_round(deadline_s=10.0, min_wait=11.0)
    info = core.start_round(quorum=0.5, deadline_s=60.0, min_wait=2.0)
    assert info.policy["min_wait"] == 2.0 and info.quorum == 2
    for d in ("a", "b"):  # the quorum, inside the wait: stored, the round stays open
        now[0] = T0 + 0.5
        assert core.handle(f"device.{d}.update", d, membership.update(d, info.round_id, m)).action == "ack"
    core.tick()
    assert getattr(store.info(info.round_id), "state", None) == "open"
    now[0] = T0 + 2.0
    core.tick()  # the wait is over: the ticker closes the round (merge, downlink, closed)
    closed = store.info(info.round_id)
    assert closed is not None and closed.state == "closed" and closed.received == ["a", "b"]
