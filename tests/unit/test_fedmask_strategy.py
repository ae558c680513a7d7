"""FedMask behind the strategy interface (shared/strategies/fedmask.py): the same masks as the pinned
simulations, every FedMask variant equal to run_fedmask device for device, and the server half's
refusals of untrusted hellos and updates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.data import FederatedDataset, load_task
from shared.device import FedMaskConfig
from shared.errors import CodecError
from shared.models import ModelSpec
from shared.payloads import Part, bits_part
from shared.presets import preset
from shared.sim.byzantine import Adversary
from shared.sim.strategy_run import run_strategy
from shared.sim.variants import MASK_VARIANTS, STRATEGY_VARIANTS, VARIANTS, VIA_STRATEGY, default_config, run_variant
from shared.strategies import StrategyConfig, get_strategy
from shared.strategies.fedmask import FedMaskDevice, FedMaskServer
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from tests.unit.test_pinned_results import SIM_PINS, _digest

# What the pinned runs cost in strategy messages (hellos and updates up; tasks and masks down). FedMask's
# own codec (SIM_PINS) spends 11,071 and 7,716: the payloads are the same packed bits, the envelopes differ
# (a strategy task carries no layout, deadline or mask version; the version rides in `round`).
STRATEGY_BYTES = (11019, 6540)


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=8, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=32)


def _cfg() -> FedMaskConfig:
    return FedMaskConfig(train=preset("digits").mask_train, local_epochs=2)


@pytest.mark.parametrize("merge", sorted(SIM_PINS))
def test_the_strategy_reproduces_the_pinned_masks(merge: str, digits: FederatedDataset, tmp_path: Path) -> None:
    spec, cfg = _spec(digits), _cfg()
    r = run_strategy("fedmask", StrategyConfig(fedmask=cfg, merge=merge), digits, spec, rounds=3, sample_rate=0.5,
                     seed=3, save_dir=tmp_path)
    assert _digest(tmp_path, spec, cfg, 3) == SIM_PINS[merge][0]
    assert (r.uplink_bytes, r.downlink_bytes) == STRATEGY_BYTES
    assert r.extra["hello_bytes"] > 0 and r.extra["downloads"] == r.extra["updates"] == 12


@pytest.mark.parametrize("variant", [v for v in MASK_VARIANTS if v != "fedmask"])  # fedmask: the pins above
def test_every_fedmask_variant_runs_the_same_through_the_strategy(variant: str, digits: FederatedDataset,
                                                                  tmp_path: Path) -> None:
    cfg = default_config(variant, preset("digits")).with_(local_epochs=2, final_local_epochs=1)
    spec = _spec(digits)
    runs = []
    for via in (False, True):
        save = tmp_path / str(via)
        r = run_variant(cfg, digits, spec, rounds=3, sample_rate=0.5, seed=3, save_devices=save, via_strategy=via)
        runs.append((_digest(save, spec.with_(personal_head=cfg.personal_head), cfg.fedmask_config(), 3), r))
    (own_masks, own), (strategy_masks, strategy) = runs
    assert strategy_masks == own_masks
    assert strategy.per_device_accuracy == own.per_device_accuracy
    assert strategy.validation_accuracy == own.validation_accuracy
    assert strategy.extra["downloads"] == own.extra["downloads"]  # fedpm: its final broadcast included
    assert strategy.extra["via"] == "strategy" and strategy.method == variant


def test_run_variant_refuses_what_the_strategy_does_not_carry() -> None:
    assert set(VIA_STRATEGY) | set(STRATEGY_VARIANTS) == set(VARIANTS)  # every variant has a strategy
    with pytest.raises(ValueError, match="Byzantine hook"):
        run_variant(default_config("fedmask", preset("digits")), load_task("digits", num_devices=2, seed=0),
                    ModelSpec("mlp", (64,), 10, width=8), rounds=1, sample_rate=1.0, seed=0, via_strategy=True,
                    adversary=Adversary(frozenset({"digits-000"}), "invert"))
    with pytest.raises(ValueError, match="delta coding"):
        FedMaskServer(ModelSpec("mlp", (64,), 10, width=8),
                      StrategyConfig(fedmask=FedMaskConfig(coding="delta")), seed=0, rounds=1)
    with pytest.raises(ValueError, match="agreement rule"):
        FedMaskServer(ModelSpec("mlp", (64,), 10, width=8), StrategyConfig(broadcast_final=True), seed=0, rounds=1)


def _enrolled(digits: FederatedDataset) -> tuple[FedMaskServer, list[FedMaskDevice]]:
    spec, cfg = _spec(digits), StrategyConfig(fedmask=_cfg(), merge="head")
    server = FedMaskServer(spec, cfg, seed=0, rounds=2)
    devices = []
    for d in digits.devices[:2]:
        dev = FedMaskDevice(d.device_id, spec, cfg, (d.train.x, d.train.y), 0)
        dev.prepare()
        hello = dev.hello()
        server.enrol(decode_strategy(encode_strategy(hello), expect_type="shello"))
        devices.append(dev)
    return server, devices


def _reason(call: object, *args: object) -> str:
    with pytest.raises(CodecError) as err:
        call(*args)  # type: ignore[operator]
    return err.value.reason


def test_the_server_half_refuses_untrusted_hellos_and_updates(digits: FederatedDataset) -> None:
    server, (a, _) = _enrolled(digits)
    hello = a.hello()
    structure = hello.part("structure")
    assert server.enrol(hello) is None  # the same structure again: a no-op
    flipped = bits_part("structure", ~structure.bits())
    assert _reason(server.enrol, replace(hello, parts=(flipped,))) == "structure_changed"
    stranger = replace(hello, device="stranger")
    assert _reason(server.enrol, replace(stranger, parts=(flipped,))) == "bad_structure"
    assert _reason(server.enrol, replace(stranger, model="ab" * 16)) == "wrong_model"
    assert _reason(server.enrol, replace(stranger, parts=(bits_part("structure", structure.bits()[:-1]),))) == \
        "bad_length"
    assert _reason(server.enrol, replace(stranger, parts=())) == "missing_field"

    task = decode_strategy(encode_strategy(server.task(1, a.device_id)), expect_type="stask")
    assert task.parts == ()  # nothing global travels in a task
    update = a.train(task)
    short = replace(update, parts=(bits_part("mask", update.part("mask").bits()[:-1]),))
    assert _reason(server.fold, 1, {a.device_id: short}) == "bad_length"
    assert _reason(server.fold, 1, {"stranger": replace(update, device="stranger")}) == "unknown_device"
    assert _reason(server.fold, 1, {a.device_id: replace(update, model="ab" * 16)}) == "wrong_model"
    out = server.fold(1, {a.device_id: update})
    assert list(out) == [a.device_id] and out[a.device_id].round == 1  # the version rides in `round`


def test_the_device_half_refuses_a_mask_of_another_size(digits: FederatedDataset) -> None:
    server, (a, _) = _enrolled(digits)
    update = a.train(server.task(1, a.device_id))
    mask = server.fold(1, {a.device_id: update})[a.device_id]
    bits = mask.part("mask").bits()
    assert _reason(a.apply, replace(mask, parts=(bits_part("mask", np.append(bits, True)),))) == "bad_length"
    assert _reason(a.apply, replace(mask, model="cd" * 16)) == "wrong_model"
    before = a.model.mask_bits().copy()
    a.apply(server.model_message(a.device_id))  # the evaluation message carries nothing
    assert np.array_equal(a.model.mask_bits(), before)
    a.apply(mask)
    assert a.runtime.mask_version == 1


def test_other_strategies_take_no_hello_payload() -> None:
    server = get_strategy("fedavg").server(ModelSpec("mlp", (64,), 10, width=8), StrategyConfig(), seed=0, rounds=1)
    hello = StrategyMessage(type="shello", strategy="fedavg", device="d", round=0, model="ab" * 16,
                            parts=(Part(name="structure", enc="bits", n=8, values=b"\xff"),))
    assert decode_strategy(encode_strategy(hello)) == hello  # the codec carries it: the half decides
    assert _reason(server.enrol, hello) == "forbidden_field"
    server.enrol(replace(hello, parts=()))
