"""The capacity check (shared/sim/pooled.py, `fedmask bench capacity`): one model on the pooled data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ops.cli import main
from shared.data import load_task
from shared.models import ModelSpec
from shared.presets import preset
from shared.sim.pooled import pooled, train_pooled
from shared.sim.variants import default_config


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return load_task("digits", num_devices=6, seed=0)


def _spec(data) -> ModelSpec:  # type: ignore[no-untyped-def]
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=64, seed=0)


def test_pooled_concatenates_every_device_split(data) -> None:  # type: ignore[no-untyped-def]
    x, y = pooled(data, "train")
    assert len(y) == sum(len(d.train) for d in data.devices)
    assert np.array_equal(y[: len(data.devices[0].train)], data.devices[0].train.y)
    assert x.shape[1:] == data.devices[0].train.x.shape[1:]


@pytest.mark.parametrize("variant", ["fedmask-local", "fedpm", "fedavg"])
def test_the_epoch_is_chosen_on_validation_and_test_is_the_device_mean(data, variant: str) -> None:  # type: ignore[no-untyped-def]
    cfg = default_config(variant, preset("digits"))
    r = train_pooled(cfg, data, _spec(data), epochs=3, seed=1)
    vals = [c["validation"] for c in r.curve]
    assert len(r.curve) == 3
    assert r.chosen_epoch == 1 + int(np.argmax(vals))  # argmax: the earliest of equal validation figures
    assert r.validation_accuracy == max(vals)
    assert r.test_accuracy == r.curve[r.chosen_epoch - 1]["test"]
    assert 0.3 < r.test_accuracy <= 1.0  # 10 classes: far above chance after 3 pooled epochs
    again = train_pooled(cfg, data, _spec(data), epochs=3, seed=1)
    assert again.curve == r.curve  # seeded: the same figures every run


def test_a_mask_variant_trains_one_mask_and_leaves_the_frozen_weights(data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shared.sim.pooled as mod

    built = []
    original = mod.build_model

    def spy(spec):  # type: ignore[no-untyped-def]
        built.append(original(spec))
        return built[-1]

    monkeypatch.setattr(mod, "build_model", spy)
    cfg = default_config("fedmask-agree", preset("digits"))  # agree has a personal head: pooled drops it
    train_pooled(cfg, data, _spec(data), epochs=1, seed=0)
    model = built[0]
    assert not model.spec.dense and not model.spec.personal_head
    fresh = original(model.spec)
    for trained, initial in zip(model.masked(), fresh.masked(), strict=True):
        assert np.array_equal(trained.weight.detach().numpy(), initial.weight.detach().numpy())
    assert any(not np.array_equal(t.scores.detach().numpy(), f.scores.detach().numpy())
               for t, f in zip(model.masked(), fresh.masked(), strict=True))


def test_strategy_variants_and_zero_epochs_are_refused(data) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="strategy interface"):
        train_pooled(default_config("feddst", preset("digits")), data, _spec(data), epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        train_pooled(default_config("fedavg", preset("digits")), data, _spec(data), epochs=0, seed=0)


def test_the_command_reports_mean_and_spread_as_json() -> None:
    out = CliRunner().invoke(main, ["bench", "capacity", "--task", "digits", "--variants", "fedavg",
                                    "--epochs", "2", "--seeds", "0,1", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    runs = payload["runs"]["fedavg"]
    assert [r["seed"] for r in runs] == [0, 1]
    tests = [r["test"] for r in runs]
    assert payload["summary"]["fedavg"]["mean"] == pytest.approx(float(np.mean(tests)))
    assert payload["summary"]["fedavg"]["std"] == pytest.approx(float(np.std(tests, ddof=1)))
