"""The round path's side of a removal (aggregator/core.py close, on real Redis, the in-memory transport
as its downlink): a board removed while its round is closing, and the close resumed by a process that
never cached the board's structure (a restart, or another aggregator taking over). Its structure is
gone, so its update cannot be merged: the round closes on the others instead of failing for ever."""

from __future__ import annotations

import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore
from shared import codec
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.transport import InMemoryTransport

TASK, WIDTH, SEED, N = "digits", 32, 0, 3
pytestmark = pytest.mark.services


def test_a_board_removed_while_its_round_closes_does_not_stall_a_resumed_close(store: RoundStore) -> None:
    full = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1)
    bus = InMemoryTransport()
    core = AggregatorCore(store, bus, spec, merge="head")
    devs = {d.device_id: DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), SEED)
            for d in full.devices[:N]}
    for d, dev in devs.items():
        assert core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"
    info = core.start_round(rate=1.0, quorum=1.0, deadline_s=600.0)
    r = info.round_id
    removed, *kept = devs
    for d in kept:  # stored, not the last: the round stays open
        task = codec.decode(bus.take_downlink(d)[0], expect_type="task")
        assert core.handle(f"device.{d}.update", d, codec.encode(devs[d].handle_task(task))).action == "ack"
    task = codec.decode(bus.take_downlink(removed)[0], expect_type="task")
    body = codec.encode(devs[removed].handle_task(task))
    # The last update stored and a closer elected in one step (what _update does), which dies before merging.
    assert store.ingest_update(r, removed, body, core.clock()) == ("stored", True)
    store.remove_device(removed, None)  # `devices remove` meanwhile: the round is closing, so it is kept
    assert removed in store.updates(r)
    restarted = AggregatorCore(store, bus, spec, merge="head")
    assert restarted.resume() == [r]
    assert store.info(r).state == "closed"  # type: ignore[union-attr]
    masks = {d: [codec.decode(b) for b in bus.take_downlink(d)] for d in devs}
    assert masks[removed] == [] and all(len(masks[d]) == 1 and masks[d][0].round == r for d in kept)
    assert store.mask(removed) is None and all(store.mask(d) is not None for d in kept)
