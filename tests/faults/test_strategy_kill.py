"""Strategy rounds killed mid-round over the real broker (issue 12, item 4's kill-point suite).

`fedmask aggregator run --strategy fedavg` is armed to SIGKILL itself at one fault point of round 2
(the update stored but not acked; the closer elected with nothing published; every downlink
published but the folded state not saved), three `fedmask worker --strategy fedavg` processes keep
running, and `fedmask round run --rounds 3` keeps waiting. A fresh aggregator started after the kill
resumes: the broker redelivers the unacked update (a duplicate of the stored one), the cut-short
close is finished by the restarted process. The run must still equal the simulator bit for bit
(tests/integration/strategy_reference.py: every board's model, the server's version, the test
accuracies, the bytes), every round closed exactly once, no update lost or counted twice.

The machine's RabbitMQ and Redis serve it (only the test's own aggregator is killed), in a vhost and
under device ids of its own.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.core import FAULT_ENV
from aggregator.store import RoundStore
from tests.integration.pipeline_fleet import start_pipeline, wait
from tests.integration.strategy_reference import BOARDS, ROUNDS, assert_pipeline_equals_simulator

pytestmark = [pytest.mark.services, pytest.mark.faults]
FIRST = 17  # device ids 17-19: no other test enrols them at the same time (broker users are global)
# The n-th hit of each point falls in round 2: `stored` is hit once per update (3 a round), the close
# points once per close.
POINTS = {"stored": BOARDS + 1, "merging": 2, "published_all": 2}


@pytest.fixture(params=[pytest.param(p, marks=[] if p == "merging" else pytest.mark.exhaustive) for p in POINTS])
def pipeline(request: pytest.FixtureRequest, amqp_service_url: str, redis_service_url: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    point = request.param
    monkeypatch.setenv(FAULT_ENV, f"{point}:{POINTS[point]}")  # only the aggregator reads it
    flags = ["--strategy", "fedavg"]
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=FIRST, n=BOARDS,
                        aggregator_args=[*flags, "--planned-rounds", str(ROUNDS)], worker_args=flags) as p:
        yield {**p, "strategy": "fedavg", "point": point}


def test_a_killed_strategy_aggregator_restarts_and_the_run_equals_the_simulator(pipeline: dict[str, Any],
                                                                                 redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]
    procs: list[subprocess.Popen[bytes]] = pipeline["procs"]
    point: str = pipeline["point"]
    log_path: Path = pipeline["tmp"] / "aggregator.log"
    seen: dict[str, Any] = {}

    def kill_and_restart(run: subprocess.Popen[str]) -> None:
        first = procs[0]
        wait(lambda: first.poll() is not None or run.poll() is not None, 240, f"the aggregator's kill at {point}")
        log = log_path.read_text()
        assert first.returncode == -9 and f"{FAULT_ENV}={point}:{POINTS[point]} reached" in log, log[-2000:]
        seen["round"] = store.current_round()
        seen["state"] = store.info(2).state if store.info(2) is not None else None  # type: ignore[union-attr]
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        with log_path.open("a") as out:
            procs.append(subprocess.Popen(pipeline["aggregator_cmd"], env=env, stdout=out, stderr=subprocess.STDOUT))

    pipeline["during_run"] = kill_and_restart
    assert_pipeline_equals_simulator(pipeline, redis_service_url)
    # The kill fell in round 2, as planned: open while an update was unacked, or cut short in its close.
    assert seen["round"] == 2 and seen["state"] == ("open" if point == "stored" else "closing"), seen
    counters = store.counters()
    print(f"\n[{point}] counters {counters}")  # shown with -s or -rA
    assert counters.get("rounds:closed", 0) == ROUNDS, counters  # each round closed exactly once
    assert "late:dropped" not in counters, counters  # a redelivered update is never taken for a late one
    stored, duplicates = counters.get("updates:stored", 0), counters.get("updates:duplicate", 0)
    if point == "stored":
        # The update the killed process stored came back as a redelivery, recognised as a duplicate;
        # the killed process never counted it (the counter is written after the store).
        assert (stored, duplicates) == (ROUNDS * BOARDS - 1, 1), counters
    else:
        # Every update counted once. The close runs inside the handler of the update that completed
        # the round (or in the deadline ticker): in the first case that update was not acked yet when
        # the kill came, and its redelivery is a duplicate.
        assert stored == ROUNDS * BOARDS and duplicates <= 1, counters
    assert "resumed closing rounds [2]" in log_path.read_text() or point == "stored"
