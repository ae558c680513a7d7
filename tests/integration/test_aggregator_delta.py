"""Delta-coded updates through the aggregator core on real Redis: the same masks as raw updates, fewer
bytes both ways, decoded at ingest (Redis keeps the raw update), a stale or wrong base refused with its
reason, and a redelivery after the close still recognised as a duplicate."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore
from shared import codec
from shared.data import FederatedDataset, load_task
from shared.delta_codec import encode_change
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.transport import InMemoryTransport

TASK, WIDTH, SEED, N, ROUNDS = "digits", 64, 0, 4, 3
SPEC = model_spec(TASK, width=WIDTH, seed=SEED)
pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    full = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    return FederatedDataset(full.task, full.devices[:N], full.num_classes, full.input_shape)


@pytest.fixture()
def raw_store(redis_service_url: str) -> Iterator[RoundStore]:
    """A second store under its own prefix, for the raw-coded twin of a run."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    s = RoundStore.from_url(redis_service_url, prefix=prefix)
    yield s
    keys = list(s.client.scan_iter(match=f"{prefix}*".encode(), count=500))
    if keys:
        s.client.delete(*keys)
    s.close()


class Fleet:
    """N devices of one coding, an aggregator core and its downlink; every body goes through the codec."""

    def __init__(self, store: RoundStore, data: FederatedDataset, coding: str) -> None:
        cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=2, coding=coding)
        self.store, self.bus = store, InMemoryTransport()
        self.core = AggregatorCore(store, self.bus, SPEC, merge="head")
        self.devs = {d.device_id: DeviceRuntime(d.device_id, SPEC, cfg, (d.train.x, d.train.y), SEED)
                     for d in data.devices}
        self.up_bytes = self.mask_bytes = 0
        self.encodings: list[tuple[str, str | None]] = []  # (type, enc) of every update and mask
        for d, dev in self.devs.items():
            assert self.core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"

    def train(self) -> dict[str, bytes]:
        """Start a round; every sampled device trains on its task and returns its encoded update."""
        self.core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=SEED)
        bodies = {}
        for d, dev in self.devs.items():
            for body in self.bus.take_downlink(d):
                update = dev.handle_task(codec.decode(body, expect_type="task"))
                bodies[d] = codec.encode(update)
                self.up_bytes += len(bodies[d])
                self.encodings.append(("update", update.enc))
        return bodies

    def deliver(self, bodies: dict[str, bytes]) -> None:
        for d, body in bodies.items():
            assert self.core.handle(f"device.{d}.update", d, body).action == "ack", d

    def apply_masks(self) -> None:
        for d, dev in self.devs.items():
            for body in self.bus.take_downlink(d):
                msg = codec.decode(body, expect_type="mask")
                self.mask_bytes += len(body)
                self.encodings.append(("mask", msg.enc))
                dev.handle_mask(msg)


def test_delta_updates_give_the_raw_runs_masks(store: RoundStore, raw_store: RoundStore,
                                               data: FederatedDataset) -> None:
    delta, raw = Fleet(store, data, "delta"), Fleet(raw_store, data, "raw")
    for r in range(1, ROUNDS + 1):
        for fleet in (delta, raw):
            fleet.deliver(fleet.train())
            assert fleet.store.info(r).state == "closed"  # type: ignore[union-attr]
            fleet.apply_masks()
    for d in delta.devs:
        assert np.array_equal(delta.devs[d].model.mask_bits(), raw.devs[d].model.mask_bits()), d
        assert store.mask(d) == raw_store.mask(d) and store.mask_version(d) == ROUNDS
    # Every message of the delta fleet was delta-coded; Redis holds raw updates (decoded at ingest).
    assert {e for _, e in delta.encodings} == {"delta"} and {e for _, e in raw.encodings} == {"structure"}
    assert all(codec.decode(b).enc == "structure" for b in store.updates(ROUNDS).values())
    # A small model (digits, width 64): the ~200-byte headers weigh; measured 0.63 and 0.32 of raw.
    assert delta.up_bytes < 0.7 * raw.up_bytes and delta.mask_bytes < 0.4 * raw.mask_bytes
    assert store.counters().get("updates:stored") == N * ROUNDS


def test_stale_and_wrong_bases_are_refused(store: RoundStore, data: FederatedDataset) -> None:
    fleet = Fleet(store, data, "delta")
    fleet.deliver(fleet.train())
    fleet.apply_masks()  # every device now holds merged mask v1, and so does Redis
    bodies = fleet.train()
    d = sorted(bodies)[0]
    msg = codec.decode(bodies[d])
    assert msg.enc == "delta" and msg.base == 1

    stale = codec.encode(replace(msg, base=5))  # a version the aggregator never held
    assert fleet.core.handle(f"device.{d}.update", d, stale).reason == "stale_base"
    # Coded against another mask than v1 while claiming v1: the decoded CRC gives it away.
    dev = fleet.devs[d]
    assert dev.sent is not None and msg.nbits is not None
    wrong_base = bytes(len(dev.sent[1]))
    payload = encode_change(dev.sent[1], wrong_base, msg.nbits)
    forged = replace(msg, bits=payload, crc32=zlib.crc32(payload))
    assert fleet.core.handle(f"device.{d}.update", d, codec.encode(forged)).reason in ("bad_base", "bad_delta")
    counters = store.counters()
    assert counters["rejected:stale_base"] == 1
    assert counters.get("rejected:bad_base", 0) + counters.get("rejected:bad_delta", 0) == 1
    assert d not in store.info(2).received  # type: ignore[union-attr]  # nothing of those was stored

    fleet.deliver(bodies)  # the honest updates still close the round
    assert store.info(2).state == "closed"  # type: ignore[union-attr]
    # A redelivery after the close is coded against v1, which Redis keeps as the previous mask: it is
    # decoded and recognised as a duplicate (acked), not refused as stale.
    assert fleet.core.handle(f"device.{d}.update", d, bodies[d]).action == "ack"
    assert store.counters()["updates:duplicate"] == 1


def test_agreement_aggregators_refuse_delta_updates(store: RoundStore, data: FederatedDataset) -> None:
    """Under the agreement rule Redis holds theta levels, not bits: there is no base to decode against."""
    fleet = Fleet(store, data, "delta")
    bodies = fleet.train()
    agree = AggregatorCore(store, InMemoryTransport(), SPEC, merge="agreement")
    d = sorted(bodies)[0]
    assert agree.handle(f"device.{d}.update", d, bodies[d]).reason == "stale_base"
