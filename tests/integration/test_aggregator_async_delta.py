"""Delta-coded updates in the aggregator's async mode (aggregator/async_delta.py) on real Redis: a mixed
fleet coding delta gets the raw-coded fleet's merged masks and stored stream bit for bit (the stored
order replayed through AsyncBuffer too), with fewer bytes both ways; a delta against a version the
aggregator does not hold, or with a wrong CRC, is refused with its reason and the board still gets its
next task (its worker then sends raw bits)."""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import pytest

from aggregator.core_async import AsyncCore
from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from shared import codec
from shared.async_buffer import AsyncBuffer
from shared.data import FederatedDataset
from shared.delta_codec import encode_change
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.rounds import unpack_update
from shared.transport import InMemoryTransport
from tests.integration.test_aggregator_async import SEED, TASK, WIDTH, K, _run_fleet, data  # noqa: F401
from tests.integration.test_aggregator_delta import raw_store  # noqa: F401

pytestmark = pytest.mark.services
STEPS = 12


class TallyTransport(InMemoryTransport):
    """The in-memory downlink, tallying merged-mask bytes and encodings."""

    def __init__(self) -> None:
        super().__init__()
        self.mask_bytes, self.mask_encs = 0, set[str]()

    def publish_downlink(self, device_id: str, body: bytes) -> None:
        msg = codec.decode(body)
        if msg.type == "mask":
            self.mask_bytes += len(body)
            self.mask_encs.add(str(msg.enc))
        super().publish_downlink(device_id, body)


def _stream(store: RoundStore, fleet_data: FederatedDataset,
            coding: str) -> tuple[AsyncCore, TallyTransport, dict, int]:
    bus = TallyTransport()
    core = AsyncCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head", buffer_k=K,
                     max_staleness=4, staleness="sqrt")
    up = {"bytes": 0, "delta": 0, "raw": 0}
    handle = core.handle

    def tally(routing_key: str, user: str | None, body: bytes):  # type: ignore[no-untyped-def]
        msg = codec.decode(body)
        if msg.type == "update":
            up["bytes"] += len(body)
            up["delta" if msg.enc == "delta" else "raw"] += 1
        return handle(routing_key, user, body)

    core.handle = tally  # type: ignore[method-assign]
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1, coding=coding)
    devs, _, _, redelivered = _run_fleet(core, bus, fleet_data, steps=STEPS, cfg=cfg)
    masks = {d: dev.model.mask_bits() for d, dev in devs.items()}
    return core, bus, {"up": up, "masks": masks}, redelivered


def test_async_delta_fleet_equals_the_raw_fleet_with_fewer_bytes(store: RoundStore, raw_store: RoundStore,  # noqa: F811
                                                                 data: FederatedDataset) -> None:  # noqa: F811
    core, bus, delta, _ = _stream(store, data, "delta")
    _, raw_bus, raw, _ = _stream(raw_store, data, "raw")
    assert delta["up"]["delta"] > 0 and raw["up"]["delta"] == 0 and "delta" in bus.mask_encs
    assert store.counters().get("rejected:stale_base", 0) == 0  # every delta was decoded
    for d, bits in raw["masks"].items():
        assert np.array_equal(delta["masks"][d], bits), d
        assert store.mask(d) == raw_store.mask(d), d
    # The stored stream is the raw one: the same ids, each decoded update's bits, the same flushes.
    mine, theirs = AsyncStore(store), AsyncStore(raw_store)
    order, raw_order = mine.order(), theirs.order()
    assert [u for u, _ in order] == [u for u, _ in raw_order]
    for (_, body), (_, raw_body) in zip(order, raw_order, strict=True):
        a, b = codec.decode(body), codec.decode(raw_body)
        assert a.enc == "structure" and (a.bits, a.version) == (b.bits, b.version)
    assert mine.flushes() == theirs.flushes() and mine.state().counts == theirs.state().counts
    # The stored order replayed through a fresh AsyncBuffer gives each board's last merged mask in Redis.
    buf = AsyncBuffer(k=K, max_staleness=4, staleness="sqrt")
    structures = {d: np.frombuffer(store.structure(d) or b"", np.uint8) for d in raw["masks"]}
    last: dict[str, tuple[bytes, int]] = {}
    for uid, body in order:
        msg = codec.decode(body, expect_type="update")
        buf.store(msg.device, unpack_update(msg, core._record(msg.device), core.nbits), int(msg.version or 0), uid)
        if buf.due:
            out = buf.flush(core.rule, core.ctx, structures)
            last |= {d: (m.tobytes(), out.version) for d, m in out.masks.items()}
    assert last == {d: store.mask(d) for d in last}
    print(f"async delta vs raw, {STEPS} steps: updates {delta['up']['bytes']} / {raw['up']['bytes']} B "
          f"({delta['up']['delta']} of {delta['up']['delta'] + delta['up']['raw']} delta-coded), "
          f"masks {bus.mask_bytes} / {raw_bus.mask_bytes} B")
    assert delta["up"]["bytes"] < raw["up"]["bytes"] and bus.mask_bytes < raw_bus.mask_bytes


def test_async_refuses_a_stale_or_forged_delta_and_the_board_gets_its_next_task(
        store: RoundStore, data: FederatedDataset) -> None:  # noqa: F811
    bus = InMemoryTransport()
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    core = AsyncCore(store, bus, spec, merge="head", buffer_k=1, max_staleness=4)
    d = data.devices[0]
    dev = DeviceRuntime(d.device_id, spec, FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1,
                                                         coding="delta"), (d.train.x, d.train.y), SEED)
    rk = f"device.{d.device_id}.update"
    assert core.handle(f"device.{d.device_id}.hello", d.device_id, codec.encode(dev.hello())).action == "ack"
    task = codec.decode(bus.take_downlink(d.device_id)[0], expect_type="task")
    msg = dev.handle_task(task)
    assert msg.enc == "delta" and msg.base == 0  # coded against the initial mask

    stale = replace(msg, base=7, version=0)  # a version the aggregator never held
    assert core.handle(rk, d.device_id, codec.encode(stale)).reason == "stale_base"
    assert dev.sent is not None and msg.nbits is not None
    other = bytearray(dev._held_bits() or b"")  # v0 inside the structure, one byte changed: another base
    other[0] ^= 0xFF
    payload = encode_change(dev.sent[1], bytes(other), msg.nbits, dev._layer_segments())
    forged = replace(msg, bits=payload, crc32=zlib.crc32(payload))
    assert core.handle(rk, d.device_id, codec.encode(forged)).reason in ("bad_base", "bad_delta")
    bad_crc = replace(msg, mask_crc32=(msg.mask_crc32 or 0) ^ 1)  # the honest change, a wrong CRC
    assert core.handle(rk, d.device_id, codec.encode(bad_crc)).reason == "bad_base"
    stream = AsyncStore(store)
    assert stream.state().counts.get("stored", 0) == 0 and stream.state().counts["refused_delta"] == 3
    # Not wedged: each refusal sent the next task; the worker, having coded once against v0, goes raw.
    tasks = [codec.decode(b, expect_type="task") for b in bus.take_downlink(d.device_id)]
    assert [t.round for t in tasks] == [2, 2, 2]
    retry = dev.handle_task(tasks[0])
    assert retry.enc == "structure"
    assert core.handle(rk, d.device_id, codec.encode(retry)).action == "ack"
    assert stream.state().counts["stored"] == 1 and stream.state().version == 1  # buffer 1: flushed
