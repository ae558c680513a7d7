"""A kill point of the async aggregator (`--mode async`, aggregator/core_async.py) on the real pipeline:
the aggregator SIGKILLs itself at "stored" (FEDMASK_FAULT=stored:9: the 9th update is in Redis, its
delivery not acked, its board's next task not sent, and the flush it made due not run), is restarted,
and the stream goes on. Then the workers stop and the aggregator drains the uplink, so:
  - nothing lost: every update a board's broker confirmed is stored, once (the redelivered one counts
    as a duplicate, not a second store);
  - the flush the kill cut short runs on restart (resume), and the killed update's board got its next
    task (it went on contributing);
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
KILL_AT = 3 * K  # the store that makes the third flush due: two flushes committed before it
MORE_FLUSHES = 3  # after the restart


@pytest.fixture()
def pipeline(amqp_service_url: str, redis_service_url: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    # start_pipeline hands its environment to every process; only the aggregator reads FEDMASK_FAULT.
    monkeypatch.setenv(FAULT_ENV, f"stored:{KILL_AT}")
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=2 * N, slow=2,
                        aggregator_args=AGGREGATOR_ARGS, worker_args=[]) as p:
        yield p


def test_async_kill_at_stored(pipeline: dict[str, object]) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    procs: list[subprocess.Popen[bytes]] = pipeline["procs"]  # type: ignore[assignment]
    stream = AsyncStore(store)
    first = procs[0]
    wait(lambda: first.poll() is not None, 90, "the aggregator's kill at 'stored'")
    log = (tmp / "aggregator.log").read_text()
    assert first.returncode == -9 and f"{FAULT_ENV}=stored:{KILL_AT} reached" in log, log[-2000:]
    at_kill = stream.state()
    killed, _ = stream.order()[-1]  # stored by the killed process, never acked
    assert at_kill.counts["stored"] == KILL_AT and at_kill.version == 2 and at_kill.counts["pending"] == K
    assert store.counters().get("updates:stored", 0) == KILL_AT - 1  # the kill came before the counter

    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    with (tmp / "aggregator.log").open("a") as out:
        procs.append(subprocess.Popen(pipeline["aggregator_cmd"], env=env, stdout=out,  # type: ignore[call-overload]
                                      stderr=subprocess.STDOUT))
    again = procs[-1]
    wait(lambda: stream.state().version >= at_kill.version + MORE_FLUSHES, 90, "flushes after the restart")
    assert stream.flushes()[at_kill.version]["devices"] == at_kill.buffer  # the cut-short flush, as it was due

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
    assert c.get("duplicate", 0) >= 1 and counters.get("updates:duplicate", 0) == c["duplicate"]
    assert counters.get("updates:stored", 0) == c["stored"] - 1  # the killed store, counted once in the stream
    assert killed in r.merged_in  # merged by the flush the restart ran
    device, task = killed.rsplit(":", 1)
    assert any(int(u.rsplit(":", 1)[1]) > int(task) for u in uids if u.startswith(device + ":")), \
        f"{device} got no task after its update {task} was cut short"
