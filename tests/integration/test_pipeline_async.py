"""The real pipeline in async mode: one aggregator process (`--mode async --buffer 3`) and six worker
processes (two emulating a Pi 4, five times slower) over RabbitMQ and Redis, no rounds; with the preset
(merge head: merged bits down) and with fedmask-agree (sampled uploads, the agreement theta down as q4).

The stream runs until it has flushed a few times with the slow boards in it; then the aggregator is
stopped (SIGTERM drains: the delivery in hand is settled) and the workers are let finish what their
queues hold, so what Redis says and what each board holds can be compared exactly:
  - none lost, none twice: merged + replaced + buffered = stored = distinct stored update ids, and
    each stored update is one its board's broker confirmed;
  - every update a slow board contributed was merged (or replaced by its own next one, which was
    merged), except a still-buffered one, and the board received the merged mask of every flush it
    was in (its <device>.stats.jsonl);
  - the stored arrival order replayed through AsyncBuffer gives the same flushes, and each board's
    last merged mask bit for bit, both as Redis keeps it and as the board holds it (<device>.npz)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from shared import codec
from shared.bits import select
from tests.integration.async_fleet import K, check_stream, fleet_args, held, mask_encodings, mask_versions, sent_ids
from tests.integration.pipeline_fleet import N, cli, start_pipeline, wait

pytestmark = pytest.mark.services
FLUSHES, SLOW = 6, 2


# The agreement case (~55 s) is exhaustive: make test keeps the preset's, and the agreement stream's logic
# on real Redis (tests/integration/test_aggregator_async.py) and the workers' q4 path in rounds
# (tests/integration/test_pipeline_agreement.py).
# The delta-coded case (the preset's workers with --coding delta) is exhaustive too: its ingest and flush
# coding run on real Redis in make test (tests/integration/test_aggregator_async_delta.py).
@pytest.fixture(params=["preset", pytest.param("fedmask-agree", marks=pytest.mark.exhaustive),
                        pytest.param("preset-delta", marks=pytest.mark.exhaustive)])
def pipeline(request: pytest.FixtureRequest, amqp_service_url: str, redis_service_url: str,
             tmp_path: Path) -> Iterator[dict[str, object]]:
    # Devices 12..17: test_pipeline.py takes 0..5 and test_pipeline_delta.py 6..11 (broker users are global).
    coding = ["--coding", "delta"] if request.param.endswith("-delta") else []
    aggregator_args, worker_args = fleet_args(request.param.removesuffix("-delta"))
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=2 * N, slow=SLOW,
                        aggregator_args=aggregator_args, worker_args=[*worker_args, *coding]) as p:
        yield {**p, "variant": request.param.removesuffix("-delta"), "coding": "delta" if coding else "raw"}


def test_async_pipeline(pipeline: dict[str, object], redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    procs: list[subprocess.Popen[bytes]] = pipeline["procs"]  # type: ignore[assignment]
    variant = str(pipeline["variant"])
    slow = ids[-SLOW:]
    stream = AsyncStore(store)
    wait(lambda: sorted(store.device_ids()) == sorted(ids), 60, "every worker's hello")
    wait(lambda: stream.state().version >= FLUSHES and all(any(d in f["devices"] for f in stream.flushes())  # type: ignore[operator]
                                                           for d in slow), 90, "flushes with the slow boards in them")
    status = cli("round", "status", "--json", "--redis-url", redis_service_url)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["mode"] == "async" and shown["buffer_k"] == K and shown["version"] >= FLUSHES

    # Quiesce: the aggregator drains and stops, so Redis holds its final state; the workers then apply
    # every mask already in their queues (their last task's update waits unconsumed in the uplink).
    aggregator = procs[0]
    aggregator.terminate()
    assert aggregator.wait(timeout=30) == 0
    st, flushes, r = check_stream(store, ids, variant)
    sent_to = {d: {int(f["version"]) for f in flushes if d in f["devices"]} for d in ids}
    wait(lambda: all(sent_to[d] <= mask_versions(tmp, d) for d in ids), 30, "every board's merged masks applied")
    wait(lambda: all(held(tmp, d)[0] == max(sent_to[d], default=0) for d in ids), 30, "every board's state saved")

    c = st.counts
    uids = [u for u, _ in stream.order()]
    assert c.get("duplicate", 0) == 0 and store.counters().get("updates:stored", 0) == c["stored"]
    for d in ids:  # each stored update is one its board's broker confirmed
        assert {u for u in uids if u.startswith(d + ":")} <= sent_ids(tmp, d), d

    # The target: every update a slow board contributed got a merged mask back, and the board got it.
    for d in slow:
        mine = [u for u in uids if u.startswith(d + ":")]
        assert len(mine) >= 2 and r.waiting[d] == [u for u in mine if u not in r.merged_in], d
        assert not r.waiting[d] or d in st.buffer, d  # only a buffered update (and those it replaced) waits
        assert {r.merged_in[u] for u in mine if u in r.merged_in} <= sent_to[d], d
    assert set(r.last) == set(ids)
    if r.downlink == "q4":  # every downlink a board applied was an agreement; it holds the last one's version
        assert all(mask_encodings(tmp, d) == {"q4"} for d in ids)
        assert all(held(tmp, d) == (version, b"") for d, (version, _) in r.last.items())  # no bit mask held
        return
    if pipeline["coding"] == "delta":  # Redis keeps raw updates (decoded at ingest); some masks went delta-coded
        assert all(codec.decode(body).enc == "structure" for _, body in stream.order())
        assert any("delta" in mask_encodings(tmp, d) for d in ids)
    # Bit for bit: each board holds the replay's last mask (check_stream compared Redis's).
    for d, (version, full) in r.last.items():
        assert held(tmp, d) == (version, select(full, r.structures[d], r.nbits).tobytes()), d
