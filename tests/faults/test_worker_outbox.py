"""A worker killed anywhere between training and its publish confirm ends bit-identical to an
undisturbed run (worker/outbox.py; the sequence and each kill point are in worker/runtime.py).

Each case restarts one worker with FEDMASK_WORKER_FAULT=<point>, so it SIGKILLs itself at that point
of the next round's task; the files it leaves show the kill struck there. Restarted without the fault
(same state folder), it either trains the redelivered task again from the state before training, or
re-sends the update its outbox holds; the round closes with every update once, and every merged mask,
in Redis and as each device applied it, equals the undisturbed run's (tests/faults/test_crashes.py's
Reference), bit for bit. Before the outbox, a kill after the state was saved trained the task twice.

Runs on a RabbitMQ node and a redis-server of its own (tests/faults/own_fleet.py), one per module.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.faults.own_fleet import FaultFleet, _tail, _wait, own_fleet
from tests.faults.test_crashes import ROUND_TIMEOUT, _report

pytestmark = [pytest.mark.services, pytest.mark.faults]

# point -> (outbox file left behind, <id>.sent says the round is done, the task is trained again)
KILL_POINTS = {
    "trained": (False, False, True),
    "outboxed": (True, False, False),
    "saved": (True, False, False),
    "published": (True, False, False),
    "cleared": (False, True, False),
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFleet]:
    with own_fleet(tmp_path_factory.mktemp("outbox")) as fl:
        yield fl


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", [pytest.param(k, marks=[] if k == "published"
                                                else pytest.mark.exhaustive) for k in KILL_POINTS])
def test_worker_killed_between_training_and_confirm(fleet: FaultFleet, point: str) -> None:
    victim = fleet.ids[0]
    outbox_left, sent_recorded, trains_again = KILL_POINTS[point]
    with fleet.case() as r:
        assert fleet.reference is not None
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.workers[victim].terminate()
        fleet.workers[victim].wait(timeout=30)
        log_mark = len(fleet.worker_log(victim))
        fleet.start_worker(victim, fault=point)
        _wait(lambda: f"{victim} resumed from" in fleet.worker_log(victim)[log_mark:], 60, f"{victim} to start")
        fleet.start_round(quorum=1.0)
        proc = fleet.workers[victim]
        _wait(lambda: proc.poll() is not None, ROUND_TIMEOUT, f"{victim} to reach {point}")
        assert proc.returncode == -signal.SIGKILL, \
            f"{victim} exited {proc.returncode} before reaching {point}:\n{_tail(fleet.tmp / f'{victim}.log')}"

        # What the kill left behind shows where it struck.
        outbox = fleet.state_dir / f"{victim}.outbox"
        sent = fleet.state_dir / f"{victim}.sent"
        assert outbox.exists() == outbox_left, f"outbox after a kill at {point}"
        assert (sent.exists() and int(sent.read_text()) == r) == sent_recorded, f"{victim}.sent after {point}"
        if point not in ("published", "cleared"):  # nothing reached the broker: the round waits (quorum 1.0)
            assert fleet.info(r).state == "open" and victim not in fleet.info(r).received

        fleet.start_worker(victim)  # no fault: same state folder, the task is redelivered
        fleet.wait_closed(r)
        fleet.wait_masks(r, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r, fleet.ids, before, dead_before)  # masks equal, nothing lost or twice

        tasks = [x for x in fleet.records(victim, "task") if x["round"] == r]
        assert len(tasks) == 2, "the task was not redelivered to the restarted worker"
        log = fleet.worker_log(victim)[log_mark:]
        # Only a finished task logs "trained round": the killed run never got that far.
        assert log.count(f"trained round {r} in") == (1 if trains_again else 0), log
        assert not outbox.exists() and int(sent.read_text()) == r
        if point in ("outboxed", "saved", "published"):
            assert f"re-sent its round {r} update from the outbox" in log
        if point == "published":  # the aggregator had it: the re-sent copy is a duplicate
            assert delta.get("updates:duplicate", 0) >= 1, delta
        if point == "cleared":
            assert f"already sent its round {r} update" in log
        assert "pruned once" not in log, "the restart pruned again"
        _report(f"worker killed at {point}", r, delta, f"{victim}: outbox left {outbox_left}, "
                f"trained again {trains_again}")
