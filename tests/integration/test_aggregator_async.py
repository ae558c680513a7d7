"""The aggregator's async mode (aggregator/core_async.py) on real Redis, with the in-memory transport
as its downlink: a mixed fleet (two boards three times slower) trains on whatever task it holds; every
stored update ends merged or replaced, redeliveries count nothing twice, each board gets one merged
mask per flush it was buffered in, and the recorded arrival order replayed through AsyncBuffer gives
the published masks bit for bit; the same under the agreement rule (fedmask-agree: q4 downlinks)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from aggregator.core_async import AsyncCore
from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from shared import codec
from shared.async_buffer import AsyncBuffer
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.models import ModelSpec
from shared.presets import model_spec, preset
from shared.rounds import agreement_message, mask_message, unpack_update
from shared.transport import InMemoryTransport
from shared.variant_setup import variant_setup

TASK, WIDTH, SEED, N, K = "digits", 32, 0, 4, 3
SLOW = {1: 3, 3: 3}  # device index -> it acts every that many steps
pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    full = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    return FederatedDataset(full.task, full.devices[:N], full.num_classes, full.input_shape)


def _run_fleet(core: AsyncCore, bus: InMemoryTransport, data: FederatedDataset, steps: int,
               spec: ModelSpec | None = None, cfg: FedMaskConfig | None = None,
               ) -> tuple[dict[str, DeviceRuntime], Counter[str], dict[tuple[str, int], bytes], int]:
    """Steps of a mixed fleet of DeviceRuntimes (the preset's, or `spec`/`cfg`): every message through the
    codec; returns the boards, updates sent per board, (board, version) -> downlink payload, redeliveries."""
    spec = spec or model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = cfg or FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1)
    devs = {d.device_id: DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), SEED) for d in data.devices}
    for d, dev in devs.items():
        assert core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"
    sent: Counter[str] = Counter()
    last_task = dict.fromkeys(devs, 0)
    masks: dict[tuple[str, int], bytes] = {}
    redelivered = 0
    inbox: dict[str, list[bytes]] = {d: [] for d in devs}
    for step in range(steps):
        for i, (d, dev) in enumerate(devs.items()):
            inbox[d].extend(bus.take_downlink(d))
            if step % SLOW.get(i, 1):
                continue  # a slow board: its downlinks wait in its queue
            while inbox[d]:
                msg = codec.decode(inbox[d].pop(0))
                if msg.type == "mask":
                    assert (msg.enc == "q4") == (core.rule_downlink == "q4"), msg.enc
                    masks[(d, int(msg.version or 0))] = bytes(msg.bits or b"")
                    dev.handle_mask(msg)
                elif msg.round > last_task[d]:  # the worker's outbox rule: a done task is not trained again
                    last_task[d] = msg.round
                    body = codec.encode(dev.handle_task(msg))
                    assert core.handle(f"device.{d}.update", d, body).action == "ack"
                    sent[d] += 1
                    if sent[d] % 2 == 0:  # a redelivery (an ack lost): must be a no-op
                        assert core.handle(f"device.{d}.update", d, body).action == "ack"
                        redelivered += 1
                    break  # one training per step
    for d in devs:  # the end: every board reads what its queue still holds (no more training)
        for body in inbox[d] + bus.take_downlink(d):
            msg = codec.decode(body)
            if msg.type == "mask":
                masks[(d, int(msg.version or 0))] = bytes(msg.bits or b"")
    return devs, sent, masks, redelivered


def test_async_fleet_every_update_merged_once_and_replay_matches(store: RoundStore,
                                                                 data: FederatedDataset) -> None:
    bus = InMemoryTransport()
    core = AsyncCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head", buffer_k=K,
                     max_staleness=4, staleness="sqrt")
    devs, sent, masks, redelivered = _run_fleet(core, bus, data, steps=12)
    stream = AsyncStore(store)
    st = stream.state()
    c = st.counts
    assert c["stored"] == sum(sent.values()) >= 12 and c.get("duplicate", 0) == redelivered > 0
    assert c["merged"] + c.get("replaced", 0) + len(st.buffer) == c["stored"]  # none lost, none twice
    assert c["flushes"] == st.version >= 3
    flushes = stream.flushes()
    slow = [list(devs)[i] for i in SLOW]
    assert all(any(d in f["devices"] for f in flushes) for d in slow)  # slow boards are merged too
    # One merged mask per flush a board was buffered in: versions the boards received = flush records.
    published = {(d, int(f["version"])) for f in flushes for d in f["devices"]}  # type: ignore[attr-defined]
    assert set(masks) == published
    # Replay: the stored order through a fresh AsyncBuffer, in-process, gives the same masks bit for bit.
    buf = AsyncBuffer(k=K, max_staleness=4, staleness="sqrt")
    structures = {d: np.frombuffer(store.structure(d) or b"", np.uint8) for d in devs}
    replayed: dict[tuple[str, int], bytes] = {}
    for uid, body in stream.order():
        msg = codec.decode(body, expect_type="update")
        rec = core._record(msg.device)
        buf.store(msg.device, unpack_update(msg, rec, core.nbits), int(msg.version or 0), uid)
        if buf.due:
            out = buf.flush(core.rule, core.ctx, structures)
            for d, m in out.masks.items():
                replayed[(d, out.version)] = bytes(mask_message(d, m, core._record(d), round_id=out.version,  # type: ignore[arg-type]
                                                                fingerprint=core.fingerprint, layout=core.layout,
                                                                nbits=core.nbits).bits or b"")
    assert set(replayed) == published
    assert all(replayed[key] == bits for key, bits in masks.items())
    assert buf.counts["stored"] == c["stored"] and buf.counts["replaced"] == c.get("replaced", 0)


def test_async_agreement_fleet_gets_a_q4_agreement_per_update_and_replay_matches(store: RoundStore,
                                                                                 data: FederatedDataset) -> None:
    """fedmask-agree in async mode (sampled uploads, theta down as q4, sqrt staleness): every stored update
    is merged (or replaced by its board's next), its board gets the q4 agreement of that flush, each
    board's next update names the version it applied, and the stored order replayed through AsyncBuffer
    gives every payload and what Redis keeps bit for bit."""
    setup = variant_setup(TASK, "fedmask-agree", width=WIDTH, seed=SEED)
    bus = InMemoryTransport()
    core = AsyncCore(store, bus, setup.spec, merge=setup.merge, prune_last_k=setup.fedmask.prune_last_k,
                     prune_rho=setup.fedmask.prune_rho, buffer_k=K, max_staleness=4, staleness="sqrt")
    assert "agreement theta" in core.describe_stream() and "1/sqrt(1+tau)" in core.describe_stream()
    devs, sent, q4, redelivered = _run_fleet(core, bus, data, 12, setup.spec, replace(setup.fedmask, local_epochs=1))
    stream = AsyncStore(store)
    st = stream.state()
    c = st.counts
    assert c["stored"] == sum(sent.values()) >= 12 and c.get("duplicate", 0) == redelivered > 0
    assert c["merged"] + c.get("replaced", 0) + len(st.buffer) == c["stored"] and c["flushes"] == st.version >= 3

    structures = {d: np.frombuffer(store.structure(d) or b"", np.uint8) for d in devs}
    buf = AsyncBuffer(k=K, max_staleness=4, staleness="sqrt")
    replayed: dict[tuple[str, int], bytes] = {}
    merged_in: dict[str, int] = {}  # update id -> version of the flush that merged it (or its replacement)
    waiting: dict[str, list[str]] = {d: [] for d in devs}
    bases: list[tuple[str, int]] = []
    for uid, body in stream.order():
        msg = codec.decode(body, expect_type="update")
        bases.append((msg.device, int(msg.version or 0)))
        buf.store(msg.device, unpack_update(msg, core._record(msg.device), core.nbits), int(msg.version or 0), uid)
        waiting[msg.device].append(uid)
        if buf.due:
            out = buf.flush(core.rule, core.ctx, structures)
            assert out.theta is not None and out.masks == {}
            for d in out.boards:
                rec = core._record(d)
                assert rec is not None
                replayed[(d, out.version)] = bytes(agreement_message(
                    d, out.theta, rec, round_id=out.version, fingerprint=core.fingerprint, layout=core.layout,
                    nbits=core.nbits).bits or b"")
                merged_in |= dict.fromkeys(waiting[d], out.version)
                waiting[d] = []
    assert replayed == q4  # every q4 agreement every board received, bit for bit, and no other
    assert all(not ids or d in st.buffer for d, ids in waiting.items())  # unmerged: only the buffered ones
    assert all((uid.rsplit(":", 1)[0], v) in q4 for uid, v in merged_in.items())  # each merged update: its q4 came
    assert len(merged_in) + sum(len(ids) for ids in waiting.values()) == c["stored"]
    # A board's update names the version it trained from: the q4 agreement it applied last, or 0.
    assert all(base == 0 or (d, base) in q4 for d, base in bases) and max(b for _, b in bases) > 0
    for d in devs:  # Redis keeps each board's last q4 payload as published (what a returning board is resent)
        mine = [v for dd, v in q4 if dd == d]
        assert store.mask(d) == ((q4[(d, max(mine))], max(mine)) if mine else None), d


def test_async_refuses_rounds_and_a_future_base(store: RoundStore, data: FederatedDataset) -> None:
    bus = InMemoryTransport()
    core = AsyncCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head", buffer_k=K)
    with pytest.raises(Exception, match="async mode"):
        core.start_round(rate=1.0)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    d = data.devices[0]
    dev = DeviceRuntime(d.device_id, spec, FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1),
                        (d.train.x, d.train.y), SEED)
    core.handle(f"device.{d.device_id}.hello", d.device_id, codec.encode(dev.hello()))
    task = codec.decode(bus.take_downlink(d.device_id)[0], expect_type="task")
    assert task.round == 1 and task.version == 0
    upd = dev.handle_task(task)
    forged = codec.make_update(device=upd.device, round=upd.round, model=upd.model, layout=upd.layout,
                               bits=upd.bits or b"", nbits=upd.nbits, version=7)
    decision = core.handle(f"device.{d.device_id}.update", d.device_id, codec.encode(forged))
    assert (decision.action, decision.reason) == ("reject", "future_base")
    assert AsyncStore(store).state().counts.get("stored", 0) == 0


def test_the_stream_state_stays_bounded(store: RoundStore, data: FederatedDataset) -> None:
    """A months-long stream: the replay log keeps its last replay_keep updates and the flush records
    their last flush_keep, and a redelivery of an update trimmed from the log is still a duplicate."""
    bus = InMemoryTransport()
    core = AsyncCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head", buffer_k=K, replay_keep=5)
    core.stream.flush_keep = 2
    devs, sent, _, _ = _run_fleet(core, bus, data, steps=6)
    stream, st = core.stream, core.stream.state()
    stored = st.counts["stored"]
    assert stored == sum(sent.values()) > 5 and st.version > 2
    order = stream.order()
    assert len(order) == 5 and store.client.hlen(stream.k["log"]) == 5  # the last 5, bodies with them
    assert [int(f["version"]) for f in stream.flushes()] == [st.version - 1, st.version]  # type: ignore[call-overload]
    assert store.client.hlen(stream.k["done"]) == len(devs)  # one field per board, not one per update
    first = next(d for d in devs if sent[d])  # its task-1 update left the log long ago
    assert f"{first}:1" not in dict(order)
    dev = DeviceRuntime(first, model_spec(TASK, width=WIDTH, seed=SEED),
                        FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1),
                        next((d.train.x, d.train.y) for d in data.devices if d.device_id == first), SEED)
    dev.hello()  # the same device's state rebuilt (same seeds: the same structure)
    again = dev.handle_task(codec.make_task(device=first, round=1, model=core.fingerprint, layout=core.layout,
                                            bits=b"", nbits=0, version=0, deadline=0.0))
    assert core.handle(f"device.{first}.update", first, codec.encode(again)).action == "ack"
    assert stream.state().counts["stored"] == stored  # a duplicate: stored once, long ago
    with pytest.raises(ValueError):
        AsyncStore(store, replay_keep=-1)
