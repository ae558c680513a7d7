"""The simulator end to end on the tiny digits fixture, and the CLI over it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ops.cli import main
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.models import ModelSpec
from shared.presets import preset
from shared.sim.baselines import run_baseline
from shared.sim.fedmask import run_fedmask

ROUNDS = 3


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=8, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=32)


def _run(data: FederatedDataset, merge: str, save: Path | None = None, final: int = 0):  # type: ignore[no-untyped-def]
    cfg = FedMaskConfig(train=preset("digits").mask_train, local_epochs=2)
    return run_fedmask(data, _spec(data), cfg, rounds=ROUNDS, sample_rate=0.5, seed=3, merge=merge,
                       save_dir=save, final_local_epochs=final)


def test_same_seed_same_masks(digits: FederatedDataset, tmp_path: Path) -> None:
    a = _run(digits, "paper", tmp_path / "a")
    b = _run(digits, "paper", tmp_path / "b")
    assert a.per_device_accuracy == b.per_device_accuracy
    assert a.uplink_bytes == b.uplink_bytes
    for f in sorted((tmp_path / "a").glob("*.npz")):
        with np.load(f) as za, np.load(tmp_path / "b" / f.name) as zb:
            assert all(np.array_equal(za[k], zb[k]) for k in za.files)


def test_uplink_is_under_one_bit_per_param(digits: FederatedDataset) -> None:
    cfg = FedMaskConfig(train=preset("digits").mask_train, local_epochs=1)
    spec = ModelSpec("mlp", digits.input_shape, digits.num_classes, width=128)
    r = run_fedmask(digits, spec, cfg, rounds=ROUNDS, sample_rate=0.5, seed=3)
    assert r.extra["updates"] == ROUNDS * 4
    # Structure-only coding: payload bits per parameter = the share of elements in the structure.
    density = r.extra["structure_density"]
    assert density < 1.0
    assert abs(r.extra["uplink_payload_bits_per_param"] - density) < 0.01
    # With the message header included, still below 1 bit per masked parameter.
    assert r.extra["uplink_payload_bits_per_param"] < r.uplink_bits_per_param < 1.0
    assert 0.0 <= r.personalized_accuracy <= 1.0
    assert set(r.per_device_accuracy) == {d.device_id for d in digits.devices}


def test_device_state_round_trips(digits: FederatedDataset, tmp_path: Path) -> None:
    _run(digits, "body", tmp_path)
    path = sorted(tmp_path.glob("*.npz"))[0]
    spec = DeviceRuntime.read_spec(path)
    dev = DeviceRuntime(path.stem, spec, FedMaskConfig(), (np.zeros(0), np.zeros(0)), seed=spec.seed)
    dev.load(path)
    assert dev.structure is not None and dev.mask_version >= 0
    assert not (dev.model.mask_bits() & ~dev.model.structure_bits()).any()


@pytest.mark.parametrize("method", ["fedavg", "fedavg-ft", "standalone", "topk"])
def test_baselines_run_and_count_bytes(digits: FederatedDataset, method: str) -> None:
    r = run_baseline(method, digits, _spec(digits), preset("digits").dense_train, rounds=ROUNDS,
                     sample_rate=0.5, local_epochs=2, seed=0)
    assert 0.0 <= r.personalized_accuracy <= 1.0
    if method == "standalone":
        assert r.uplink_bytes == 0
    elif method == "topk":
        assert r.uplink_bytes < r.downlink_bytes / 3  # 10% of values + indices vs the dense model
    else:
        final_downloads = len(digits.devices) if method == "fedavg-ft" else 0
        assert r.uplink_bytes == r.downlink_bytes - (4 * r.params + 200) * final_downloads


def test_fedavg_ft_fine_tunes_the_epochs_it_is_given(digits: FederatedDataset) -> None:
    """final_local_epochs is FedAvg-FT's tuned knob (0: local_epochs); it once had no effect."""
    def run(final: int) -> dict[str, float]:
        return run_baseline("fedavg-ft", digits, _spec(digits), preset("digits").dense_train, rounds=2,
                            sample_rate=0.5, local_epochs=2, seed=0, final_local_epochs=final).per_device_accuracy
    assert run(0) == run(2)
    assert run(1) != run(2)


def test_cli_simulate_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["simulate", "--task", "digits", "--devices", "6", "--rounds", "2", "--width", "16",
                                    "--json-out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    for key in ("method", "task", "devices", "rounds", "personalized_accuracy", "per_device_accuracy",
                "uplink_bytes", "downlink_bytes", "uplink_bits_per_param", "train_seconds"):
        assert key in payload
    assert payload["devices"] == 6 and payload["rounds"] == 2


def test_cli_rejects_bad_task_cleanly() -> None:
    res = CliRunner().invoke(main, ["simulate", "--task", "nope"])
    assert res.exit_code == 2 and "nope" in res.output


def test_set_changes_a_variants_knobs_for_one_run_and_the_result_records_them() -> None:
    base = ["simulate", "--task", "digits", "--devices", "6", "--rounds", "1", "--width", "16", "--quiet", "--json",
            "--variant", "fedavg"]
    plain = CliRunner().invoke(main, base)
    changed = CliRunner().invoke(main, [*base, "--set", "local_epochs=1", "--set", "weight_optimizer=sgd"])
    assert plain.exit_code == 0 and changed.exit_code == 0, plain.output + changed.output
    a, b = json.loads(plain.stdout)["extra"]["config"], json.loads(changed.stdout)["extra"]["config"]
    assert (b["local_epochs"], b["train"]["weight_optimizer"]) == (1, "sgd")  # JSON 1, text "sgd"
    assert a["local_epochs"] != 1 or a["train"]["weight_optimizer"] != "sgd"
    assert {k: v for k, v in b.items() if k not in ("local_epochs", "train")} == \
        {k: v for k, v in a.items() if k not in ("local_epochs", "train")}  # nothing else moved
    assert json.loads(plain.stdout)["personalized_accuracy"] != json.loads(changed.stdout)["personalized_accuracy"]


def test_set_refuses_unknown_knobs_and_runs_without_a_variant() -> None:
    unknown = CliRunner().invoke(main, ["simulate", "--task", "digits", "--variant", "fedavg", "--set", "bogus=1"])
    assert unknown.exit_code != 0 and "unknown knobs ['bogus']" in unknown.output
    bare = CliRunner().invoke(main, ["simulate", "--task", "digits", "--set", "lr=1"])
    assert bare.exit_code == 2 and "give --variant too" in bare.output
    malformed = CliRunner().invoke(main, ["simulate", "--task", "digits", "--variant", "fedavg", "--set", "lr"])
    assert malformed.exit_code == 2 and "KNOB=VALUE" in malformed.output
