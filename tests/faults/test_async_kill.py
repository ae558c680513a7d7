"""The kill points of the async aggregator (`--mode async`, aggregator/core_async.py) on the real
pipeline: the aggregator SIGKILLs itself at one point (FEDMASK_FAULT) of the update that makes the third
flush due (the 9th stored: two flushes committed before it), is restarted, and the stream goes on:
  consumed       the 9th update read, not stored: redelivered, stored then (not a duplicate)
  stored         the 9th in Redis, its delivery not acked, its board's next task not sent, the flush
                 not run: the flush runs on restart (resume), the redelivery is a duplicate and sends
                 the task
  merging        as stored, but counted and the task sent; the flush merged, nothing published
  published_all  as merging, the masks published and kept (fm:device:*:mask), the flush not committed:
                 the restart publishes the same version again (boards drop the repeat by version)
Then the workers stop and the aggregator drains the uplink, so:
  - nothing lost: every update a board's broker confirmed is stored, once (a redelivered one counts
    as a duplicate, not a second store);
  - the flush the kill cut short is the one the restart runs, over the same buffer;
  - the stream's invariants and the replay through AsyncBuffer hold bit for bit (async_fleet.check_stream).

Only the aggregator process is killed: the services are the shared fixtures' (the RabbitMQ and Redis
restarts are tests/faults/test_crashes.py's, on nodes of their own)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.core import FAULT_ENV
from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from tests.integration.async_fleet import AGGREGATOR_ARGS, K, check_stream, sent_ids
from tests.integration.pipeline_fleet import N, start_pipeline, wait

pytestmark = [pytest.mark.services, pytest.mark.faults]
KILL_AT = 3 * K  # the update that makes the third flush due: two flushes committed before it
MORE_FLUSHES = 3  # after the restart
# point -> its FEDMASK_FAULT count (the flush points are hit once per flush), whether the 9th update was
# stored before the kill, whether the updates:stored counter saw it
POINTS = {"consumed": (KILL_AT, False, False), "stored": (KILL_AT, True, False),
          "merging": (3, True, True), "published_all": (3, True, True)}


@pytest.fixture(params=[pytest.param(k, marks=[] if k == "stored" else pytest.mark.exhaustive) for k in POINTS])
def pipeline(request: pytest.FixtureRequest, amqp_service_url: str, redis_service_url: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    # start_pipeline hands its environment to every process; only the aggregator reads FEDMASK_FAULT.
    point = request.param
    monkeypatch.setenv(FAULT_ENV, f"{point}:{POINTS[point][0]}")
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=2 * N, slow=2,
                        aggregator_args=AGGREGATOR_ARGS, worker_args=[]) as p:
        yield {**p, "point": point}


def test_async_kill_and_restart(pipeline: dict[str, object]) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    procs: list[subprocess.Popen[bytes]] = pipeline["procs"]  # type: ignore[assignment]
    point: str = pipeline["point"]  # type: ignore[assignment]
    hits, in_redis, counted = POINTS[point]
    stream = AsyncStore(store)
    first = procs[0]
    wait(lambda: first.poll() is not None, 90, f"the aggregator's kill at {point!r}")
    log = (tmp / "aggregator.log").read_text()
    assert first.returncode == -9 and f"{FAULT_ENV}={point}:{hits} reached" in log, log[-2000:]
    at_kill = stream.state()
    assert at_kill.version == 2 and at_kill.counts["stored"] == KILL_AT - (not in_redis)
    assert at_kill.counts["pending"] == K - (not in_redis)
    assert store.counters().get("updates:stored", 0) == KILL_AT - (not counted)
    killed = stream.order()[-1][0] if in_redis else None  # stored by the killed process, never acked
    if point == "published_all":  # the cut-short flush's masks were kept before the kill
        assert all(store.mask(d) is not None and store.mask(d)[1] == 3 for d in at_kill.buffer)  # type: ignore[index]

    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    with (tmp / "aggregator.log").open("a") as out:
        procs.append(subprocess.Popen(pipeline["aggregator_cmd"], env=env, stdout=out,  # type: ignore[call-overload]
                                      stderr=subprocess.STDOUT))
    again = procs[-1]
    wait(lambda: stream.state().version >= at_kill.version + MORE_FLUSHES, 90, "flushes after the restart")
    if in_redis:  # the cut-short flush, over the buffer it was due with
        assert stream.flushes()[at_kill.version]["devices"] == at_kill.buffer

    # Stop the boards (each settles the delivery in hand), let the aggregator drain the uplink, stop it.
    for w in procs[1:1 + len(ids)]:
        w.terminate()
    for w in procs[1:1 + len(ids)]:
        assert w.wait(timeout=60) == 0
    def confirmed() -> set[str]:
        return set[str]().union(*(sent_ids(tmp, d) for d in ids))

    wait(lambda: confirmed() <= {u for u, _ in stream.order()}, 30, "every confirmed update stored")
    again.terminate()
    assert again.wait(timeout=30) == 0

    st, _, r = check_stream(store, ids)
    c, counters = st.counts, store.counters()
    uids = [u for u, _ in stream.order()]
    assert set(uids) == confirmed()  # nothing lost, nothing invented
    assert counters.get("updates:duplicate", 0) == c.get("duplicate", 0) >= (1 if in_redis else 0)
    assert counters.get("updates:stored", 0) == c["stored"] - (in_redis and not counted)  # the killed one: once
    if killed is None:
        return  # "consumed": the 9th was stored after the restart like any other
    assert r.merged_in.get(killed) == at_kill.version + 1  # merged by the flush the restart ran
    device, task = killed.rsplit(":", 1)
    assert any(int(u.rsplit(":", 1)[1]) > int(task) for u in uids if u.startswith(device + ":")), \
        f"{device} got no task after its update {task} was cut short"
