"""The real pipeline in async mode: one aggregator process (`--mode async --buffer 3`) and six worker
processes (two emulating a Pi 4, five times slower) over RabbitMQ and Redis, no rounds.

The stream runs until it has flushed a few times with the slow boards in it; then the aggregator is
stopped (SIGTERM drains: the delivery in hand is settled) and the workers are let finish what their
queues hold, so what Redis says and what each board holds can be compared exactly:
  - none lost, none twice: merged + replaced + buffered = stored = distinct stored update ids;
  - every update a slow board contributed was stored and merged (or replaced by its own next one, which
    was merged), except the one still buffered, and the board received the merged mask of every
    flush it was in (its <device>.stats.jsonl);
  - the stored arrival order replayed through AsyncBuffer gives the flush count, and each board's
    last merged mask bit for bit, both as Redis keeps it and as the board holds it (<device>.npz)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from aggregator.core_async import AsyncCore, update_id
from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from shared import codec
from shared.async_buffer import AsyncBuffer
from shared.bits import select
from shared.rounds import unpack_update
from shared.transport import InMemoryTransport
from shared.variant_setup import PRESET_VARIANT, variant_setup
from tests.integration.pipeline_fleet import SEED, TASK, WIDTH, N, cli, start_pipeline, wait

pytestmark = pytest.mark.services
K, MAX_STALENESS, STALENESS, FLUSHES, SLOW = 3, 4, "sqrt", 6, 2


@pytest.fixture()
def pipeline(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    # Devices 12..17: test_pipeline.py takes 0..5 and test_pipeline_delta.py 6..11 (broker users are global).
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=2 * N, slow=SLOW,
                        aggregator_args=["--merge", "head", "--mode", "async", "--buffer", str(K), "--max-staleness",
                                         str(MAX_STALENESS), "--staleness", STALENESS], worker_args=[]) as p:
        yield p


def _stats(tmp: Path, device: str) -> list[dict[str, Any]]:
    path = tmp / "state" / f"{device}.stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _held(tmp: Path, device: str) -> tuple[int, bytes]:
    """(mask version, merged bits inside the structure) the board saved: its <device>.npz."""
    with np.load(tmp / "state" / f"{device}.npz", allow_pickle=False) as z:
        return int(z["meta"][0]), z["held"].tobytes() if "held" in z.files else b""


def test_async_pipeline(pipeline: dict[str, object], redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    procs: list[subprocess.Popen[bytes]] = pipeline["procs"]  # type: ignore[assignment]
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
    st = stream.state()
    flushes = cast(list[dict[str, Any]], stream.flushes())
    sent_to = {d: {int(f["version"]) for f in flushes if d in f["devices"]} for d in ids}
    wait(lambda: all(sent_to[d] <= {int(r["version"]) for r in _stats(tmp, d) if r["type"] == "mask"}
                     for d in ids), 30, "every board's merged masks applied")
    wait(lambda: all(_held(tmp, d)[0] == max(sent_to[d], default=0) for d in ids), 30, "every board's state saved")

    # None lost, none twice.
    c = st.counts
    order = stream.order()
    uids = [u for u, _ in order]
    assert len(uids) == len(set(uids)) == c["stored"] and c.get("duplicate", 0) == 0
    assert store.counters().get("updates:stored", 0) == c["stored"]
    assert c["merged"] + c.get("replaced", 0) + len(st.buffer) == c["stored"]
    assert c["flushes"] == st.version == len(flushes) and c["pending"] < K
    assert c["merged"] == sum(len(f["devices"]) for f in flushes)
    # Each stored update is one the board says it sent (<device>:<task round>).
    for d in ids:
        sent = {update_id(d, int(r["round"])) for r in _stats(tmp, d) if r["type"] == "update"}
        assert {u for u in uids if u.startswith(d + ":")} <= sent, d

    # Replay the stored order through AsyncBuffer with the aggregator's merge rule and context.
    setup = variant_setup(TASK, PRESET_VARIANT, width=WIDTH, seed=SEED, merge="head")
    core = AsyncCore(store, InMemoryTransport(), setup.spec, merge=setup.merge,
                     prune_last_k=setup.fedmask.prune_last_k, prune_rho=setup.fedmask.prune_rho, buffer_k=K,
                     max_staleness=MAX_STALENESS, staleness=STALENESS)
    structures = {d: np.frombuffer(store.structure(d) or b"", np.uint8) for d in ids}
    buf = AsyncBuffer(k=K, max_staleness=MAX_STALENESS, staleness=STALENESS)
    merged_in: dict[str, int] = {}  # update id -> the version of the flush that merged it (or its replacement)
    waiting: dict[str, list[str]] = {d: [] for d in ids}  # stored, not yet merged
    last: dict[str, tuple[int, np.ndarray]] = {}
    for uid, body in order:
        msg = codec.decode(body, expect_type="update")
        assert buf.store(msg.device, unpack_update(msg, core._record(msg.device), core.nbits), int(msg.version or 0),
                         uid) != "duplicate"
        waiting[msg.device].append(uid)
        if buf.due:
            out = buf.flush(core.rule, core.ctx, structures)
            assert sorted(out.masks) == sorted(flushes[out.version - 1]["devices"])
            for d, m in out.masks.items():
                merged_in |= dict.fromkeys(waiting[d], out.version)
                waiting[d] = []
                last[d] = (out.version, m)
    assert buf.version == st.version and buf.buffer == st.buffer
    assert buf.counts["replaced"] == c.get("replaced", 0) and buf.counts["merged"] == c["merged"]

    # The target: every update a slow board contributed got a merged mask back, and the board got it.
    for d in slow:
        mine = [u for u in uids if u.startswith(d + ":")]
        assert len(mine) >= 2 and waiting[d] == [u for u in mine if u not in merged_in], d
        assert not waiting[d] or d in st.buffer, d  # only a buffered update (and those it replaced) waits
        assert {merged_in[u] for u in mine if u in merged_in} <= sent_to[d], d
    # Bit for bit: the replay's last mask of each board = Redis's = the one the board holds.
    for d, (version, full) in last.items():
        kept = store.mask(d)
        assert kept is not None and kept == (full.tobytes(), version), d
        assert _held(tmp, d) == (version, select(full, structures[d], core.nbits).tobytes()), d
    assert set(last) == set(ids)
