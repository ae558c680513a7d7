"""What the async-mode pipeline tests read back from a fleet started by pipeline_fleet.start_pipeline:
the boards' own records (<device>.stats.jsonl, <device>.npz) and the replay of the stored arrival order
through the simulator's AsyncBuffer with the aggregator's merge rule. Shared by
tests/integration/test_pipeline_async.py and tests/faults/test_async_kill.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from aggregator.core_async import AsyncCore
from aggregator.store import RoundStore
from aggregator.store_async import AsyncState, AsyncStore
from shared import codec
from shared.async_buffer import AsyncBuffer
from shared.rounds import DeviceRecord, unpack_update
from shared.transport import InMemoryTransport
from shared.variant_setup import PRESET_VARIANT, variant_setup
from tests.integration.pipeline_fleet import SEED, TASK, WIDTH

K, MAX_STALENESS, STALENESS = 3, 4, "sqrt"
STREAM_ARGS = ["--mode", "async", "--buffer", str(K), "--max-staleness", str(MAX_STALENESS), "--staleness", STALENESS]
AGGREGATOR_ARGS = ["--merge", "head", *STREAM_ARGS]


def fleet_args(variant: str) -> tuple[list[str], list[str]]:
    """(aggregator flags, worker flags) of an async stream of `variant` (preset: AGGREGATOR_ARGS, merge head)."""
    if variant == PRESET_VARIANT:
        return AGGREGATOR_ARGS, []
    return ["--variant", variant, *STREAM_ARGS], ["--variant", variant]


def stats(tmp: Path, device: str) -> list[dict[str, Any]]:
    path = tmp / "state" / f"{device}.stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sent_ids(tmp: Path, device: str) -> set[str]:
    """The update ids (<device>:<task round>) the board's broker confirmed."""
    return {f"{device}:{int(r['round'])}" for r in stats(tmp, device) if r["type"] == "update"}


def mask_versions(tmp: Path, device: str) -> set[int]:
    return {int(r["version"]) for r in stats(tmp, device) if r["type"] == "mask"}


def mask_encodings(tmp: Path, device: str) -> set[str]:
    return {str(r["enc"]) for r in stats(tmp, device) if r["type"] == "mask"}


def held(tmp: Path, device: str) -> tuple[int, bytes]:
    """(mask version, merged bits inside the structure) the board saved: its <device>.npz."""
    with np.load(tmp / "state" / f"{device}.npz", allow_pickle=False) as z:
        return int(z["meta"][0]), z["held"].tobytes() if "held" in z.files else b""


@dataclass
class Replay:
    buf: AsyncBuffer
    nbits: int
    structures: dict[str, np.ndarray]
    downlink: str  # "bits" (merged masks) or "q4" (the agreement rule's theta levels)
    flush_devices: list[list[str]] = field(default_factory=list)  # per replayed flush, its merged boards
    flush_voters: list[int] = field(default_factory=list)  # per replayed flush, the updates that voted
    merged_in: dict[str, int] = field(default_factory=dict)  # update id -> version of the flush that merged it
    waiting: dict[str, list[str]] = field(default_factory=dict)  # device -> stored ids not merged yet
    # device -> its last (version, what Redis keeps): the packed full merged mask, or the q4 payload as sent
    last: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


def replay(store: RoundStore, ids: list[str], order: list[tuple[str, bytes]], variant: str = PRESET_VARIANT,
           flushes: list[dict[str, Any]] | None = None, structures: dict[str, np.ndarray] | None = None) -> Replay:
    """The stored order through a fresh AsyncBuffer, in-process, with the rule and context the
    aggregator process built (`variant`; the preset's with merge head). A replaced update counts as merged
    by the flush that merged its replacement: the board got one mask for both. The boards a flush
    record names as `removed` (`fedmask devices remove`) are removed in that replayed flush too; their
    structures are gone from Redis then, so a stream with removals passes `structures` read before."""
    setup = variant_setup(TASK, variant, width=WIDTH, seed=SEED, merge="head" if variant == PRESET_VARIANT else None)
    core = AsyncCore(store, InMemoryTransport(), setup.spec, merge=setup.merge,
                     prune_last_k=setup.fedmask.prune_last_k, prune_rho=setup.fedmask.prune_rho, buffer_k=K,
                     max_staleness=MAX_STALENESS, staleness=STALENESS)
    if structures is None:
        structures = {d: np.frombuffer(store.structure(d) or b"", np.uint8) for d in ids}
    records = {d: DeviceRecord(s) for d, s in structures.items()}
    r = Replay(AsyncBuffer(k=K, max_staleness=MAX_STALENESS, staleness=STALENESS), core.nbits, structures,
               core.rule_downlink, waiting={d: [] for d in ids})
    for uid, body in order:
        msg = codec.decode(body, expect_type="update")
        status = r.buf.store(msg.device, unpack_update(msg, records[msg.device], core.nbits),
                             int(msg.version or 0), uid)
        assert status != "duplicate", uid  # the stored order never holds an id twice
        r.waiting[msg.device].append(uid)
        if r.buf.due:
            record = flushes[len(r.flush_devices)] if flushes else {}
            out = r.buf.flush(core.rule, core.ctx, structures, removed=record.get("removed", []))
            r.flush_devices.append(sorted(out.boards))
            r.flush_voters.append(out.voters)
            sent = core.flush_messages(out, records)  # the service's own downlinks for this flush
            for d in out.dropped:
                r.waiting[d] = []
            for d in out.boards:
                r.merged_in |= dict.fromkeys(r.waiting[d], out.version)
                r.waiting[d] = []
                kept = np.frombuffer(sent[d].bits or b"", np.uint8) if out.theta is not None else out.masks[d]
                r.last[d] = (out.version, kept)
    return r


def check_stream(store: RoundStore, ids: list[str], variant: str = PRESET_VARIANT,
                 structures: dict[str, np.ndarray] | None = None) -> tuple[AsyncState, list[dict[str, Any]], Replay]:
    """On a stopped aggregator: the invariants of the stored stream, and the replay equal to what Redis
    keeps. None lost, none twice: merged + replaced + dropped (its board removed) + buffered = stored =
    distinct ids in the stored order; one flush record per version; every board's last merged mask
    (bytes and version) in Redis is the replay's, bit for bit (under the agreement rule: its q4
    payload), and a removed board's is gone."""
    stream = AsyncStore(store)
    st = stream.state()
    flushes = cast(list[dict[str, Any]], stream.flushes())
    order = stream.order()
    uids = [u for u, _ in order]
    c = st.counts
    assert len(uids) == len(set(uids)) == c["stored"] > 0
    assert c["merged"] + c.get("replaced", 0) + c.get("dropped_removed", 0) + len(st.buffer) == c["stored"]
    assert c["flushes"] == st.version == len(flushes) and c["pending"] < K
    assert c["merged"] == sum(len(f["devices"]) for f in flushes)
    r = replay(store, ids, order, variant, flushes, structures)
    assert r.flush_devices == [sorted(f["devices"]) for f in flushes]
    assert r.flush_voters == [f["voters"] for f in flushes]
    assert r.buf.version == st.version and r.buf.buffer == st.buffer and set(r.buf.latest) == set(st.latest)
    assert r.buf.counts["replaced"] == c.get("replaced", 0) and r.buf.counts["merged"] == c["merged"]
    assert r.buf.counts["dropped_removed"] == c.get("dropped_removed", 0)
    removed = store.removed()
    for d, (version, full) in r.last.items():
        assert store.mask(d) == (None if d in removed else (full.tobytes(), version)), d
    return st, flushes, r
