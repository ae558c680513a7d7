"""Delta coding between a device and the round logic: the same training sends the same bits whichever the
coding, a device codes only against a version the aggregator holds, a merged mask coded against the
device's own update is applied exactly, and an unknown or wrong base is refused, never applied."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared import codec
from shared.bits import pack, scatter_at
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import CodecError
from shared.presets import model_spec, preset
from shared.rounds import DeviceRecord, RoundState, delta_downlink, mask_message, undelta_update

TASK, WIDTH, SEED = "digits", 64, 0
SPEC = model_spec(TASK, width=WIDTH, seed=SEED)


def _device(coding: str) -> DeviceRuntime:
    d = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED).devices[0]
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1, coding=coding)
    return DeviceRuntime(d.device_id, SPEC, cfg, (d.train.x, d.train.y), SEED)


def _task(dev: DeviceRuntime, round_id: int, version: int) -> codec.Message:
    return codec.make_task(device=dev.device_id, round=round_id, model=dev.fingerprint, layout=dev.layout, bits=b"",
                           nbits=0, version=version, deadline=0.0)


@pytest.fixture(scope="module")
def pair() -> tuple[DeviceRuntime, DeviceRuntime]:
    raw, delta = _device("raw"), _device("delta")
    raw.hello()
    delta.hello()
    return raw, delta


def _initial(dev: DeviceRuntime) -> np.ndarray:
    return pack(DeviceRuntime(dev.device_id, SPEC, FedMaskConfig(), (np.zeros(0), np.zeros(0)), SEED)
                .model.mask_bits())


def test_the_first_update_is_coded_against_the_initial_mask(pair: tuple[DeviceRuntime, DeviceRuntime]) -> None:
    raw_dev, delta_dev = pair
    raw, delta = raw_dev.handle_task(_task(raw_dev, 1, 0)), delta_dev.handle_task(_task(delta_dev, 1, 0))
    assert raw.enc == "structure" and raw.downlink is None and raw.base is None  # raw devices: as before
    assert delta.enc == "delta" and delta.base == 0 and delta.downlink == "delta"
    assert len(codec.encode(delta)) < len(codec.encode(raw))
    assert delta_dev.structure is not None
    rec = DeviceRecord(delta_dev.structure.copy())
    decoded = undelta_update(delta, rec, delta_dev.nbits, lambda v: _initial(delta_dev) if v == 0 else None)
    assert decoded == replace(raw, downlink="delta", stats=delta.stats)  # same bits, crc, version (stats: timing)
    with pytest.raises(CodecError) as info:
        undelta_update(delta, rec, delta_dev.nbits, lambda v: None)
    assert info.value.reason == "stale_base"
    wrong = np.zeros_like(_initial(delta_dev))
    with pytest.raises(CodecError) as info:
        undelta_update(delta, rec, delta_dev.nbits, lambda v: wrong)
    assert info.value.reason in ("bad_base", "bad_delta")


def test_merged_masks_round_trip_and_stale_bases_are_refused(pair: tuple[DeviceRuntime, DeviceRuntime],
                                                             tmp_path: Path) -> None:
    raw_dev, delta_dev = pair
    assert delta_dev.structure is not None and delta_dev.sent is not None
    rec = DeviceRecord(delta_dev.structure.copy())
    nbits = delta_dev.nbits
    update_full = scatter_at(np.frombuffer(delta_dev.sent[1], np.uint8), rec.where(nbits), nbits)
    # A merged mask: the device's update with a few voted bits changed inside its structure.
    merged_bits = np.unpackbits(update_full, count=nbits).astype(bool)
    merged_bits[rec.where(nbits)[::9]] ^= True
    raw_msg = mask_message(delta_dev.device_id, pack(merged_bits), rec, round_id=1, fingerprint=delta_dev.fingerprint,
                           layout=delta_dev.layout, nbits=nbits)
    rnd = RoundState(round_id=1, sampled=[], deadline=0.0, quorum=0, received={delta_dev.device_id: update_full},
                     delta_downlink={delta_dev.device_id: 1})
    layers = [int(np.prod(s)) for _, s in delta_dev.model.layout()]
    coded = delta_downlink(raw_msg, rnd, rec, nbits=nbits, layer_sizes=layers)
    assert coded.enc == "delta" and coded.base == 1 and len(codec.encode(coded)) < len(codec.encode(raw_msg))
    assert delta_downlink(raw_msg, replace(rnd, delta_downlink={}), rec, nbits=nbits, layer_sizes=layers) is raw_msg

    stale = replace(coded, base=7)
    with pytest.raises(CodecError) as info:
        delta_dev.handle_mask(codec.decode(codec.encode(stale)))
    assert info.value.reason == "stale_base" and delta_dev.mask_version == 0  # not applied

    delta_dev.handle_mask(codec.decode(codec.encode(coded)))
    raw_dev.handle_mask(raw_msg)
    assert np.array_equal(delta_dev.model.mask_bits(), raw_dev.model.mask_bits())
    assert np.array_equal(delta_dev.model.mask_bits(), merged_bits)
    assert delta_dev.mask_version == 1 and delta_dev.held is not None

    # The bases survive a restart, so the next update is coded against merged mask v1.
    delta_dev.save(tmp_path / "d.npz")
    again = _device("delta")
    again.load(tmp_path / "d.npz")
    assert again.held is not None and np.array_equal(again.held, delta_dev.held) and again.sent == delta_dev.sent
    nxt = again.handle_task(_task(again, 2, 1))
    assert nxt.enc == "delta" and nxt.base == 1
    held_full = {1: scatter_at(again.held, rec.where(nbits), nbits)}
    assert undelta_update(nxt, rec, nbits, held_full.get).enc == "structure"

    # A task naming another version than the device holds (it missed a mask): raw bits, still asking
    # for a delta-coded merged mask (against this update, which it keeps).
    missed = again.handle_task(_task(again, 3, 2))
    assert missed.enc == "structure" and missed.version == 1 and missed.downlink == "delta"
    assert again.sent is not None and again.sent[0] == 3


def test_sampled_uploads_are_never_delta_coded() -> None:
    dev = _device("delta")
    dev.cfg = replace(dev.cfg, upload="sample")
    dev.hello()
    update = dev.handle_task(_task(dev, 1, 0))
    assert update.enc == "structure" and update.downlink is None


def test_unknown_coding_is_refused() -> None:
    with pytest.raises(ValueError, match="coding"):
        _device("xor")


def test_a_delta_run_is_the_raw_run_with_fewer_bytes() -> None:
    """Same seeds, both codings: identical accuracy per device; the delta run's raw-equivalent byte counts
    are exactly the raw run's (so one delta run reports both codings side by side)."""
    from shared.sim.fedmask import run_fedmask

    data = load_task(TASK, num_devices=8, seed=0)
    spec = model_spec(TASK, width=32, seed=0)
    runs = {coding: run_fedmask(data, spec, FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1,
                                                          coding=coding), rounds=3, sample_rate=0.5, seed=3,
                                merge="head")
            for coding in ("raw", "delta")}
    raw, delta = runs["raw"], runs["delta"]
    assert delta.per_device_accuracy == raw.per_device_accuracy
    assert delta.extra["raw_uplink_bits_per_param"] == raw.uplink_bits_per_param
    assert delta.extra["raw_downlink_bits_per_param"] == raw.extra["downlink_bits_per_param"]
    assert delta.uplink_bits_per_param < raw.uplink_bits_per_param
    assert delta.extra["downlink_bits_per_param"] < 0.6 * raw.extra["downlink_bits_per_param"]
    assert delta.extra["delta_updates"] == delta.extra["updates"] and raw.extra["delta_updates"] == 0


def test_never_two_deltas_against_one_base() -> None:
    """An update that got no merged mask back (late, or refused) is followed by raw bits: whatever the
    aggregator holds, the device resynchronises."""
    dev = _device("delta")
    dev.hello()
    first = dev.handle_task(_task(dev, 1, 0))
    again = dev.handle_task(_task(dev, 2, 0))  # no mask arrived in between
    third = dev.handle_task(_task(dev, 3, 0))
    assert (first.enc, again.enc, third.enc) == ("delta", "structure", "delta")
