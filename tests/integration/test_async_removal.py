"""A board removed (`fedmask devices remove`: the store's remove_device) from a running async stream
(aggregator/core_async.py on real Redis, the in-memory transport as its downlink), with and without an
aggregator restart in between: its buffered update is dropped at the next flush (counted
dropped_removed and updates:dropped_removed, not merged, nothing sent to it), its latest update no
longer votes for the others, and the stored order replayed through AsyncBuffer, told the removals the
flush records name, gives what Redis keeps bit for bit (async_fleet.check_stream)."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.core_async import AsyncCore
from aggregator.store import RoundStore
from ops.control.async_status import async_summary, render_async
from shared import codec
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.transport import InMemoryTransport
from tests.integration.async_fleet import MAX_STALENESS, SEED, STALENESS, TASK, WIDTH, K, check_stream

N = 4
pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    full = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    return FederatedDataset(full.task, full.devices[:N], full.num_classes, full.input_shape)


class Fleet:
    """Boards that answer their newest task when told to; the aggregator can be replaced (a restart)."""

    def __init__(self, store: RoundStore, data: FederatedDataset) -> None:
        self.store, self.bus = store, InMemoryTransport()
        spec = model_spec(TASK, width=WIDTH, seed=SEED)
        cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1)
        self.devs = {d.device_id: DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), SEED)
                     for d in data.devices}
        self.masks: dict[str, list[int]] = {d: [] for d in self.devs}  # versions each board was sent
        self.tasks: dict[str, codec.Message] = {}
        self.core = self.restart()
        for d, dev in self.devs.items():
            assert self.core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"

    def restart(self) -> AsyncCore:
        """A fresh aggregator process over the same Redis: nothing cached from the last one."""
        self.core = AsyncCore(self.store, self.bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head",
                              buffer_k=K, max_staleness=MAX_STALENESS, staleness=STALENESS)
        return self.core

    def read(self, d: str) -> None:
        for body in self.bus.take_downlink(d):
            msg = codec.decode(body)
            if msg.type == "mask":
                self.masks[d].append(int(msg.version or 0))
                self.devs[d].handle_mask(msg)
            elif d not in self.tasks or msg.round > self.tasks[d].round:
                self.tasks[d] = msg

    def answer(self, *boards: str) -> None:
        for d in boards:
            self.read(d)
            body = codec.encode(self.devs[d].handle_task(self.tasks.pop(d)))
            assert self.core.handle(f"device.{d}.update", d, body).action == "ack"

    def structures(self) -> dict[str, np.ndarray]:
        return {d: np.frombuffer(self.store.structure(d) or b"", np.uint8) for d in self.devs}


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
def test_a_removed_boards_buffered_update_is_dropped_at_the_next_flush(store: RoundStore, data: FederatedDataset,
                                                                       restart: bool) -> None:
    fleet = Fleet(store, data)
    d0, d1, d2, d3 = fleet.devs
    fleet.answer(d0, d1, d2)  # flush v1
    fleet.answer(d3)  # buffered
    structures = fleet.structures()  # the replay needs d3's structure, gone once it is removed
    store.remove_device(d3, None)
    if restart:
        fleet.restart()
    fleet.answer(d0, d1)  # flush v2: d0, d1 merged; d3 dropped
    for d in fleet.devs:
        fleet.read(d)
    st, flushes, _ = check_stream(store, list(fleet.devs), structures=structures)
    assert st.counts["dropped_removed"] == 1 and store.counters()["updates:dropped_removed"] == 1
    assert sorted(flushes[-1]["devices"]) == sorted([d0, d1]) and flushes[-1]["removed"] == [d3]
    assert flushes[-1]["voters"] == 3  # d0, d1 buffered; d2's latest (fresh); not d3's
    assert fleet.masks[d3] == [] and store.mask(d3) is None  # nothing sent to it, nothing kept for it
    assert d3 not in st.latest and d3 not in st.buffer
    assert fleet.masks[d0] == [1, 2] and fleet.masks[d2] == [1]
    assert "dropped (board removed) 1" in render_async(async_summary(store))  # what `round status` shows


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
def test_a_removed_boards_latest_update_no_longer_votes(store: RoundStore, data: FederatedDataset,
                                                         restart: bool) -> None:
    fleet = Fleet(store, data)
    d0, d1, d2, d3 = fleet.devs
    fleet.answer(d0, d1, d2)  # flush v1: d2 now only holds a latest update, which would vote at v2
    structures = fleet.structures()
    store.remove_device(d2, None)
    if restart:
        fleet.restart()
    fleet.answer(d0, d1, d3)  # flush v2
    st, flushes, _ = check_stream(store, list(fleet.devs), structures=structures)
    assert flushes[-1]["voters"] == 3 and flushes[-1]["removed"] == [d2]  # the buffered three, not d2
    assert st.counts.get("dropped_removed", 0) == 0  # its update was merged at v1: nothing dropped
    assert d2 not in st.latest
    fleet.answer(d0, d1, d3)  # flush v3: d2 is forgotten, not removed again
    st, flushes, _ = check_stream(store, list(fleet.devs), structures=structures)
    assert flushes[-1]["voters"] == 3 and flushes[-1]["removed"] == []
