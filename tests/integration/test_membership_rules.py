"""tests/membership_cases.py through the aggregator service's path (AggregatorCore.handle over real
Redis, whose membership checks are aggregator/lua/admit_update.lua) and, where the simulator has the
case, through its path too: both must give the expected outcome, and leave the same devices received."""

from __future__ import annotations

from collections import Counter

import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundInfo, RoundStore
from shared.transport import InMemoryTransport
from tests import membership_cases as membership
from tests.membership_cases import Case, Model, Result

pytestmark = pytest.mark.services
T0 = 1_700_000_000.0
DEADLINE = T0 + 60  # the clock stays at T0: no round closes on its own


@pytest.fixture(scope="module")
def model() -> Model:
    return membership.model()


def served(case: Case, store: RoundStore, m: Model) -> tuple[Result, dict[int, RoundInfo]]:
    """The case through AggregatorCore.handle; each round's RoundInfo after it."""
    core = AggregatorCore(store, InMemoryTransport(), membership.SPEC, merge="paper", clock=lambda: T0)
    for d in membership.ENROLLED:
        assert core.handle(f"device.{d}.hello", d, membership.hello(d, m)).action == "ack"
    for r in case.rounds:
        # A quorum no delivery reaches: rounds change state only where the case says so.
        store.open_round(r.id, sampled=list(r.sampled), deadline=DEADLINE, quorum=len(r.sampled) + 1, now=T0,
                         policy={"late": case.late, "max_staleness": 1})
        for d in r.delivered:
            assert core.handle(f"device.{d}.update", d, membership.update(d, r.id, m)).action == "ack"
        for d in r.carried:
            assert core.handle(f"device.{d}.update", d, membership.update(d, r.id - 1, m)).action == "ack"
        if r.state != "open":
            assert store.try_close(r.id, DEADLINE)
        if r.state == "closed":
            store.mark_closed(r.id, DEADLINE)
    before = Counter(store.counters())
    key, user, body = membership.delivery(case, m)
    decision = core.handle(key, user, body)
    counted = set(Counter(store.counters()) - before)
    if decision.action == "reject":
        outcome = decision.reason
    elif "updates:stored" in counted:
        outcome = "stored"
    elif "updates:duplicate" in counted:
        outcome = "duplicate"
    elif "late:carried" in counted:
        outcome = "carried"
    else:
        assert case.device in store.pending_devices(), f"{case.name}: acked, but neither counted nor parked"
        outcome = "parked"
    infos = {r.id: info for r in case.rounds if (info := store.info(r.id)) is not None}
    return Result(outcome, {r: info.received for r, info in infos.items()}), infos


@pytest.mark.parametrize("case", membership.CASES, ids=lambda c: c.name)
def test_both_paths_decide_every_case_alike(case: Case, store: RoundStore, model: Model) -> None:
    service, infos = served(case, store, model)
    assert service.outcome == case.expected
    if not case.service_only:
        assert membership.simulated(case, model) == service
    if case.expected == "carried":
        assert infos[max(infos)].carried == [case.device] and case.device not in infos[max(infos)].received
