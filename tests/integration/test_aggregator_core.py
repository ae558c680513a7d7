"""The aggregator's round logic on real Redis, with the in-memory transport as its downlink:
merges equal the simulator's; duplicates, late updates, spoofing and crashed closes are handled."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore
from shared import codec
from shared.bits import pack
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.sim.fedmask import run_fedmask
from shared.transport import InMemoryTransport
from shared.variant_setup import variant_setup

TASK, WIDTH, SEED, N = "digits", 32, 0, 4
pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    full = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    return FederatedDataset(full.task, full.devices[:N], full.num_classes, full.input_shape)


def _cfg() -> FedMaskConfig:
    return FedMaskConfig(train=preset(TASK).mask_train, local_epochs=2)


def _devices(data: FederatedDataset) -> dict[str, DeviceRuntime]:
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    return {d.device_id: DeviceRuntime(d.device_id, spec, _cfg(), (d.train.x, d.train.y), SEED) for d in data.devices}


def _hello_all(core: AggregatorCore, devs: dict[str, DeviceRuntime]) -> None:
    for d, dev in devs.items():
        assert core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"


def _train_round(core: AggregatorCore, bus: InMemoryTransport, devs: dict[str, DeviceRuntime]) -> dict[str, bytes]:
    bodies = {}
    for d, dev in devs.items():
        for body in bus.take_downlink(d):
            msg = codec.decode(body)
            if msg.type == "task":
                bodies[d] = codec.encode(dev.handle_task(msg))
    return bodies


def _apply_masks(bus: InMemoryTransport, devs: dict[str, DeviceRuntime]) -> None:
    for d, dev in devs.items():
        for body in bus.take_downlink(d):
            dev.handle_mask(codec.decode(body, expect_type="mask"))


def test_rounds_match_the_simulator(store: RoundStore, data: FederatedDataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bus = InMemoryTransport()
    core = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
    devs = _devices(data)
    _hello_all(core, devs)
    for r in (1, 2):
        core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=SEED)
        for d, body in _train_round(core, bus, devs).items():
            assert core.handle(f"device.{d}.update", d, body).action == "ack"
        assert store.info(r).state == "closed"  # type: ignore[union-attr]  # quorum met: closed on the last update
        _apply_masks(bus, devs)
    run_fedmask(data, model_spec(TASK, width=WIDTH, seed=SEED), _cfg(), rounds=2, sample_rate=1.0, seed=SEED,
                merge="head", save_dir=tmp_path)
    for d, dev in devs.items():
        sim = DeviceRuntime(d, dev.spec, _cfg(), (np.zeros(0), np.zeros(0)), SEED)
        sim.load(tmp_path / f"{d}.npz")
        assert np.array_equal(dev.model.mask_bits(), sim.model.mask_bits()), d
        assert dev.mask_version == 2 == store.mask_version(d)
        assert store.mask(d) == (pack(dev.model.mask_bits()).tobytes(), 2)  # Redis keeps the full merged mask


def test_agreement_rounds_match_the_simulator(store: RoundStore, data: FederatedDataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The agreement variant through the aggregator core: q4 downlinks, scores equal the simulator's."""
    setup = variant_setup(TASK, "fedmask-agree", width=WIDTH, seed=SEED)
    cfg = replace(setup.fedmask, local_epochs=1)
    bus = InMemoryTransport()
    core = AggregatorCore(store, bus, setup.spec, merge=setup.merge, prune_last_k=cfg.prune_last_k,
                          prune_rho=cfg.prune_rho)
    devs = {d.device_id: DeviceRuntime(d.device_id, setup.spec, cfg, (d.train.x, d.train.y), SEED)
            for d in data.devices}
    _hello_all(core, devs)
    for _ in (1, 2):
        core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=SEED)
        for d, body in _train_round(core, bus, devs).items():
            assert core.handle(f"device.{d}.update", d, body).action == "ack"
        for d, dev in devs.items():
            (body,) = bus.take_downlink(d)
            msg = codec.decode(body, expect_type="mask")
            inside = int(dev.model.structure_bits().sum())
            assert msg.enc == "q4" and msg.nbits == 4 * inside and store.mask(d) == (msg.bits, msg.round)
            dev.handle_mask(msg)
    run_fedmask(data, setup.spec, cfg, rounds=2, sample_rate=1.0, seed=SEED, merge=setup.merge, save_dir=tmp_path)
    for d, dev in devs.items():
        sim = DeviceRuntime(d, setup.spec, cfg, (np.zeros(0), np.zeros(0)), SEED)
        sim.load(tmp_path / f"{d}.npz")
        assert np.array_equal(dev.model.scores_flat(), sim.model.scores_flat()), d


def test_duplicate_late_spoofed_and_garbage(store: RoundStore, data: FederatedDataset) -> None:
    bus = InMemoryTransport()
    core = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
    devs = _devices(data)
    _hello_all(core, devs)
    core.start_round(rate=1.0, quorum=0.5, deadline_s=60, seed=SEED)  # quorum 2 of 4
    bodies = _train_round(core, bus, devs)
    a, b, c, d = sorted(bodies)
    assert core.handle(f"device.{a}.update", b, bodies[a]).reason == "spoofed_device"
    assert core.handle(f"device.{b}.update", a, bodies[a]).reason == "routing_mismatch"
    assert core.handle(f"device.{a}.update", a, b"\xc1garbage").reason == "undecodable"
    assert core.handle(f"device.{a}.update", a, bodies[a]).action == "ack"
    assert core.handle(f"device.{a}.update", a, bodies[a]).action == "ack"  # redelivery: a no-op
    assert len(store.info(1).received) == 1  # type: ignore[union-attr]
    assert core.handle(f"device.{b}.update", b, bodies[b]).action == "ack"  # quorum: the round closes
    assert store.info(1).state == "closed"  # type: ignore[union-attr]
    assert core.handle(f"device.{c}.update", c, bodies[c]).reason == "round_closed"  # late: dropped, counted
    counters = store.counters()
    assert counters["updates:duplicate"] == 1 and counters["late:dropped"] == 1
    assert counters["rejected:spoofed_device"] == 1 and counters["rejected:undecodable"] == 1
    masks = {dev: bus.take_downlink(dev) for dev in (a, b, c, d)}
    assert len(masks[a]) == len(masks[b]) == 1 and not masks[c] and not masks[d]  # only participants


def test_a_crashed_close_is_resumed(store: RoundStore, data: FederatedDataset) -> None:
    bus = InMemoryTransport()
    core = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
    devs = _devices(data)
    _hello_all(core, devs)
    core.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=SEED)
    bodies = _train_round(core, bus, devs)
    core.close = lambda r: {}  # type: ignore[method-assign]  # the closer "dies" right after winning
    store.set_closer(f"{socket.gethostname()}:{_dead_pid()}")  # ... as a process of this host that is gone
    for dev, body in bodies.items():
        core.handle(f"device.{dev}.update", dev, body)
    assert store.info(1).state == "closing"  # type: ignore[union-attr]
    store.set_closer("")  # the restarted process: a new pid, and it need not wait out the dead one's lease
    fresh = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
    assert fresh.resume() == [1]
    assert store.info(1).state == "closed"  # type: ignore[union-attr]
    assert all(len(bus.take_downlink(dev)) == 1 for dev in devs)
    assert fresh.resume() == []


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_another_aggregator_takes_over_only_once_the_lease_lapses(store: RoundStore, data: FederatedDataset) -> None:
    """Several aggregators on one queue: a closer on another host that stops mid-close holds the round
    until its lease lapses; then the next tick of any other finishes it, once."""
    bus = InMemoryTransport()
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    dying = AggregatorCore(store, bus, spec, merge="head")
    devs = _devices(data)
    _hello_all(dying, devs)
    dying.start_round(rate=1.0, quorum=1.0, deadline_s=60, seed=SEED)
    bodies = _train_round(dying, bus, devs)
    dying.close = lambda r: {}  # type: ignore[method-assign]
    store.set_closer("other-host:123", lease_s=1.0)
    for dev, body in bodies.items():
        dying.handle(f"device.{dev}.update", dev, body)
    assert store.info(1).state == "closing" and store.closer_of(1) == "other-host:123"  # type: ignore[union-attr]
    store.set_closer("this-host:456", lease_s=1.0)
    replica = AggregatorCore(store, bus, spec, merge="head")
    assert replica.resume() == []  # the lease is held: the other closer may still be at work
    replica.tick()
    assert store.info(1).state == "closing"  # type: ignore[union-attr]
    time.sleep(1.2)
    replica.tick()
    assert store.info(1).state == "closed" and store.counters()["rounds:taken_over"] == 1  # type: ignore[union-attr]
    assert all(len(bus.take_downlink(dev)) == 1 for dev in devs)
    replica.tick()
    assert store.counters()["rounds:taken_over"] == 1
