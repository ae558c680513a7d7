"""Redis killed (SIGKILL, not SHUTDOWN) under the shipped configuration, at each point of a round: no
acknowledged update is lost, none is counted twice, and every merged mask equals the undisturbed run's.

The redis-server runs with broker_config/redis.conf's durability options (appendonly, appendfsync,
aof-use-rdb-preamble, save; the test reads them from the file, so it tests what ships). A SHUTDOWN
fsyncs the append-only file on the way out, so it cannot show what a crash loses: these cases SIGKILL
the server, start it again on the same folder, and check what it came back with before the round goes
on. Where the kill must strike inside the aggregator's close, the aggregator stops itself there
(FEDMASK_FAULT=<point> with FEDMASK_FAULT_ACTION=stop), Redis is killed and restarted while it stands
still, and then it is let go (SIGCONT): its next Redis call fails, it retries, and finishes the close.

What a SIGKILL can and cannot show: Redis writes the AOF (write(2)) before it answers, under any
appendfsync, so after a kill of the process alone the kernel still has every answered write; what
`appendfsync always` adds (fsync before answering) protects against a crash of the host (power cut,
kernel panic), which no test here can cause. These cases therefore pin the sequence (nothing acked
before Redis has it, a crash at each point of a close survived with the same masks) under the shipped
settings; the host-crash half rests on Redis's documented fsync behaviour and the start-up check
(aggregator/store_durability.py).

Runs on a RabbitMQ node and a redis-server of its own (tests/faults/own_fleet.py), one per module.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.faults.own_fleet import FaultFleet, N, _tail, _wait, own_fleet, shipped_redis_options, stopped
from tests.faults.test_crashes import ROUND_TIMEOUT, _report

pytestmark = [pytest.mark.services, pytest.mark.faults]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFleet]:
    options = shipped_redis_options()
    assert options["appendfsync"] == "always", "the shipped redis.conf no longer fsyncs before acking"
    with own_fleet(tmp_path_factory.mktemp("redis-kill"), redis_options=options) as fl:
        yield fl


def _crash_and_restart(fleet: FaultFleet) -> None:
    """SIGKILL: whatever the append-only file had not made durable is gone. Then the same folder again;
    this process's clients drop their dead connections (the aggregator's find out on their own)."""
    fleet.redis.kill()
    fleet.redis.start()
    assert fleet.reference is not None
    for store in (fleet.store, fleet.reference.store):
        store.client.connection_pool.disconnect()


def test_redis_killed_after_updates_were_stored_and_acked(fleet: FaultFleet) -> None:
    early, late = fleet.ids[: N // 2], fleet.ids[N // 2:]
    with fleet.case() as r:
        assert fleet.reference is not None
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.signal_workers(late, signal.SIGSTOP)
        try:
            fleet.start_round(quorum=1.0)
            _wait(lambda: fleet.info(r).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates", every=0.005)
            # Killed the moment Redis holds them: the aggregator acks right after the write, so these are
            # acked now or within milliseconds; neither RabbitMQ nor the workers keep them any longer.
            _crash_and_restart(fleet)
            assert fleet.info(r).received == sorted(early), "an acknowledged update died with Redis"
        finally:
            fleet.signal_workers(late, signal.SIGCONT)
        fleet.wait_closed(r)
        fleet.wait_masks(r, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r, fleet.ids, before, dead_before)
        _report("redis SIGKILL after acks", r, delta, f"{len(early)} acked updates survived the kill")


# point (FEDMASK_FAULT) -> what Redis must hold when the aggregator stands still there:
# (round state, updates received, every merged mask stored)
STOP_POINTS = {
    "merging": ("closing", N, False),  # the closer was elected and read the updates; nothing published
    "published:2": ("closing", N, False),  # two merged masks published (confirmed); none stored yet
    "published_all": ("closing", N, True),  # every mask published and stored; not marked closed
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", [pytest.param(f, marks=[] if f == "published_all" else pytest.mark.exhaustive)
                                   for f in STOP_POINTS])
def test_redis_killed_while_a_round_closes(fleet: FaultFleet, fault: str) -> None:
    with fleet.case() as r:
        assert fleet.reference is not None
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.stop_aggregator()
        paused = fleet.start_paused_aggregator(fault)
        try:
            fleet.start_round(quorum=1.0)
            _wait(lambda: stopped(paused) or paused.poll() is not None, ROUND_TIMEOUT,
                  f"the aggregator to stop at {fault}")
            assert paused.poll() is None, \
                f"the aggregator exited {paused.returncode}:\n{_tail(fleet.aggregator_logs[-1])}"
            _crash_and_restart(fleet)
            info = fleet.info(r)
            masks_stored = all(fleet.store.mask_version(d) == r for d in fleet.ids)
            assert f"round {r} closed" not in fleet.aggregator_log(), "the aggregator ran on past the fault point"
            assert (info.state, len(info.received), masks_stored) == STOP_POINTS[fault], \
                "Redis came back without what it had acknowledged"
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        fleet.wait_closed(r)
        fleet.wait_masks(r, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r, fleet.ids, before, dead_before)
        assert paused.poll() is None, "the aggregator did not survive the Redis crash"
        retries = fleet.aggregator_log().count("retrying in")  # redis-py reconnects on its own first
        _report(f"redis SIGKILL at {fault}", r, delta, f"the same aggregator finished the close ({retries} "
                "retries logged)")


def test_redis_killed_twice_in_a_row_keeps_every_round(fleet: FaultFleet) -> None:
    """After the cases above: every closed round is still closed, with its members, after one more kill
    (the AOF's RDB preamble and its increments both replayed)."""
    with fleet.case() as r:
        rounds = {k: fleet.info(k) for k in range(1, r)}
        _crash_and_restart(fleet)
        time.sleep(0.2)
        for k, info in rounds.items():
            again = fleet.info(k)
            assert (again.state, again.received, again.closed_at) == (info.state, info.received, info.closed_at), k
