"""fedmask-adapt: a device chooses how much of the fleet's agreement to take, on its own validation split."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared import codec
from shared.agreement import blend_scores, dequantize, quantize
from shared.bits import positions
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.rounds import DeviceRecord, agreement_message
from shared.sim.variants import default_config

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _device(share_grid: tuple[float, ...], *, with_val: bool = True, share: float = 0.5) -> DeviceRuntime:
    data = load_task("digits", num_devices=4, seed=0)
    d = data.devices[0]
    cfg = default_config("fedmask-adapt", preset("digits")).fedmask_config()
    cfg = FedMaskConfig(**{**cfg.__dict__, "share_grid": share_grid, "share": share, "local_epochs": 3})
    spec = model_spec("digits", width=32, seed=0).with_(personal_head=True)
    dev = DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), seed=0,
                        val_xy=(d.val.x, d.val.y) if with_val else None)
    dev.hello()
    task = codec.make_task(device=dev.device_id, round=1, model=dev.fingerprint, layout=dev.layout, bits=b"",
                           nbits=0, version=0, deadline=0.0)
    dev.handle_task(task)
    return dev


def _agreement(dev: DeviceRuntime, theta: np.ndarray, version: int = 1) -> codec.Message:
    assert dev.structure is not None
    return agreement_message(dev.device_id, theta, DeviceRecord(dev.structure), round_id=version,
                             fingerprint=dev.fingerprint, layout=dev.layout, nbits=dev.nbits)


def _own_theta(dev: DeviceRuntime) -> np.ndarray:
    theta: np.ndarray = 1.0 / (1.0 + np.exp(-dev.model.scores_flat().astype(np.float64)))
    return theta


def test_an_agreement_that_contradicts_the_device_is_refused() -> None:
    """The fleet's agreement is the opposite of what the device learned: every share above 0 flips some of
    its trained mask, so its own validation loss is lowest at share 0, and its scores stay as they were."""
    dev = _device(GRID)
    before = dev.model.scores_flat().copy()
    theta = 1.0 - _own_theta(dev)
    assert dev.structure is not None and dev.val_xy is not None
    where = positions(dev.structure, dev.nbits)
    received = dequantize(quantize(theta[where]))  # what the device reads from the 4-bit downlink
    losses = {}
    for share in GRID:  # the loss of every blend, computed here independently of _choose_share
        trial = before.copy()
        trial[where] = blend_scores(before[where], received, share=share, clip=dev.cfg.clip)
        dev.model.set_scores(trial)
        losses[share] = dev.evaluate(*dev.val_xy)[0]
    dev.model.set_scores(before)
    assert losses[1.0] > losses[0.0]  # taking all of a contradicting agreement is refused
    dev.handle_mask(_agreement(dev, theta))
    assert dev.chosen_shares == [min(GRID, key=lambda sh: (losses[sh], abs(sh - dev.cfg.share)))]
    assert dev.mask_version == 1


def test_ties_go_to_the_tuned_share() -> None:
    """An agreement that says what the device already holds changes no sign of its scores, so every share
    scores the same on validation; the tie goes to the configured share (the task's tuned default)."""
    dev = _device(GRID, share=0.75)
    dev.handle_mask(_agreement(dev, _own_theta(dev)))
    assert dev.chosen_shares == [0.75]


def test_an_agreement_that_helps_is_taken() -> None:
    """A device that trained its scores away from a good mask (here: scores inverted) takes the agreement,
    which here is its good mask: a share above 0 has the lower validation loss."""
    dev = _device(GRID)
    good = _own_theta(dev)
    dev.model.set_scores(-dev.model.scores_flat())
    dev.handle_mask(_agreement(dev, good))
    assert dev.chosen_shares and dev.chosen_shares[0] > 0.0


def test_without_validation_data_the_configured_share_is_used() -> None:
    dev = _device(GRID, with_val=False, share=0.25)
    dev.handle_mask(_agreement(dev, 1.0 - _own_theta(dev)))
    assert dev.chosen_shares == []  # no choice was made; cfg.share (0.25) blended the agreement in
    assert dev.mask_version == 1


def test_a_share_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"share_grid values must lie in \[0, 1\]"):
        _device((0.0, 1.5))


def test_the_variant_records_its_grid_and_reads_it_back() -> None:
    cfg = default_config("fedmask-adapt", preset("digits"))
    assert cfg.share_grid == GRID and cfg.fedmask_config().share_grid == GRID
    again = type(cfg).from_json(cfg.to_json() | {"share_grid": [0.0, 1.0]}, cfg)
    assert again.share_grid == (0.0, 1.0)
    assert default_config("fedmask-agree", preset("digits")).share_grid == ()


def test_untuned_it_borrows_the_agreement_variants_tuned_choices(tmp_path: Path) -> None:
    """Without a tuning file of its own, fedmask-adapt is fedmask-agree's tuned config with a share grid;
    with one, its own file is used."""
    from shared.sim.tuning import TUNED_DIR, load_tuned

    p = preset("mnist")
    (tmp_path / "mnist").mkdir()
    shutil.copy(TUNED_DIR / "mnist" / "fedmask-agree.json", tmp_path / "mnist")
    agree = load_tuned("mnist", "fedmask-agree", p, root=tmp_path)
    adapt = load_tuned("mnist", "fedmask-adapt", p, root=tmp_path)
    assert "fedmask-agree.json" in agree.origin
    assert adapt.config.variant == "fedmask-adapt" and adapt.config.share_grid == GRID
    assert replace(adapt.config, variant="fedmask-agree", share_grid=()) == agree.config
    assert agree.origin in adapt.origin and "share chosen per device" in adapt.origin
    own = json.loads((tmp_path / "mnist" / "fedmask-agree.json").read_text())
    own["variant"], own["chosen"]["config"]["variant"] = "fedmask-adapt", "fedmask-adapt"
    own["chosen"]["config"]["share_grid"] = [0.0, 1.0]
    (tmp_path / "mnist" / "fedmask-adapt.json").write_text(json.dumps(own))
    mine = load_tuned("mnist", "fedmask-adapt", p, root=tmp_path)
    assert mine.config.share_grid == (0.0, 1.0) and "fedmask-adapt.json" in mine.origin


def test_adapt_local_is_local_training_with_the_agreement_downlink(tmp_path: Path) -> None:
    """fedmask-adapt-local borrows fedmask-local's tuned training and pruning, and keeps its own
    aggregation: the agreement rule over thresholded masks, a per-device share starting from none."""
    from shared.sim.tuning import TUNED_DIR, load_tuned

    p = preset("mnist")
    (tmp_path / "mnist").mkdir()
    shutil.copy(TUNED_DIR / "mnist" / "fedmask-local.json", tmp_path / "mnist")
    local = load_tuned("mnist", "fedmask-local", p, root=tmp_path)
    mine = load_tuned("mnist", "fedmask-adapt-local", p, root=tmp_path)
    c = mine.config
    assert (c.merge, c.upload, c.share, c.share_grid) == ("agreement", "threshold", 0.0, GRID)
    assert replace(c, variant="fedmask-local", merge="local", share=local.config.share, share_grid=()) == local.config
    assert c.train.mask_mode == "ste" and c.fedmask_config().takes_agreement
    assert not local.config.fedmask_config().takes_agreement


def test_a_contradicting_agreement_leaves_a_local_trained_device_as_it_was() -> None:
    """Share 0 chosen: the device's scores (so its mask) are exactly those local training left."""
    data = load_task("digits", num_devices=4, seed=0)
    d = data.devices[0]
    cfg = default_config("fedmask-adapt-local", preset("digits")).fedmask_config()
    dev = DeviceRuntime(d.device_id, model_spec("digits", width=32, seed=0), replace(cfg, local_epochs=3),
                        (d.train.x, d.train.y), seed=0, val_xy=(d.val.x, d.val.y))
    dev.hello()
    task = codec.make_task(device=dev.device_id, round=1, model=dev.fingerprint, layout=dev.layout, bits=b"",
                           nbits=0, version=0, deadline=0.0)
    dev.handle_task(task)
    before = dev.model.scores_flat().copy()
    assert dev.structure is not None
    inside = positions(dev.structure, dev.nbits)
    theta = np.full(dev.nbits, 0.5)
    theta[inside] = np.where(before[inside] > 0, 0.02, 0.98)  # the fleet votes against every bit it holds
    dev.handle_mask(_agreement(dev, theta))
    assert dev.chosen_shares == [0.0]
    assert np.array_equal(dev.model.scores_flat(), before)
