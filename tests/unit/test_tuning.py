"""Even-handed tuning and the seeds-and-spread report: the search, the presets files, the
statistics and the statements, on the tiny digits task (6 devices, width 16, 2 rounds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ops.cli import main
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime
from shared.models import ModelSpec
from shared.presets import preset, tuned_config
from shared.sim import tuning
from shared.sim.result import SimResult
from shared.sim.spread import compare, comparisons, mean_std, summarize
from shared.sim.tuning import (
    GRIDS,
    Trial,
    choose,
    draw_trials,
    grid_points,
    load_tuned,
    tune,
    tuned_path,
    write_record,
)
from shared.sim.variants import VARIANTS, VariantConfig, default_config, run_variant

DIGITS = preset("digits")
SMALL = ["--task", "digits", "--devices", "6", "--width", "16", "--rounds", "2", "--quiet"]


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=100)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=16, seed=100)


def _result(test: float, val: float, *, up: int = 1000, down: int = 2000,
            history: list[dict[str, float]] | None = None) -> SimResult:
    return SimResult(method="x", task="digits", devices=6, rounds=2, personalized_accuracy=test,
                     per_device_accuracy={}, uplink_bytes=up, downlink_bytes=down, uplink_bits_per_param=1.0,
                     train_seconds=0.0, wall_seconds=0.0, params=100, validation_accuracy=val,
                     history=history or [], extra={"downlink_bits_per_param": 2.0})


# -- the search ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_gets_the_same_trials_and_trial_one_is_the_default(variant: str) -> None:
    default = default_config(variant, DIGITS)
    drawn = draw_trials(variant, default, 8, seed=100)
    assert len(drawn) == 8
    assert drawn[0] == default
    assert len({json.dumps(c.to_json(), sort_keys=True) for c in drawn}) == 8  # no trial repeated
    grid = {json.dumps(c.to_json(), sort_keys=True) for c in grid_points(variant, default)}
    assert all(json.dumps(c.to_json(), sort_keys=True) in grid for c in drawn[1:])
    assert draw_trials(variant, default, 8, seed=100) == drawn  # seeded: the same draw every time
    assert draw_trials(variant, default, 8, seed=101) != drawn


def test_declared_grids_have_the_declared_sizes() -> None:
    # dense: 12 optimizer/lr pairs x 2 batches; fedmask: 6 x 2 x 3 rho x 2 K x 2 final x 2 merges;
    # fedmask-agree: 6 x 2 x 4 shares x 3 head choices x 3 rho x 2 K x 3 final; fedmask-adapt: agree without
    # the 4 shares (each device chooses its own); fedpm: 6 x 2;
    # feddst: dense 24 x 3 alphas x 3 periods x 2 rules; zerofl: dense 24 x 3 unsent rules; lg-fedavg: 24 x 2
    sizes = {v: len(grid_points(v, default_config(v, DIGITS))) for v in GRIDS}
    assert sizes == {"fedavg": 24, "standalone": 24, "fedavg-ft": 72, "topk": 72, "fedmask": 288,
                     "fedmask-local": 144, "fedmask-adapt-local": 144, "fedmask-agree": 2592,
                     "fedmask-adapt": 648, "fedpm": 12,
                     "feddst": 432, "zerofl": 72, "lg-fedavg": 48, "per-fedavg": 18,
                     "bnn-fedavg": 48}
    assert all(c.merge == "local" for c in grid_points("fedmask-local", default_config("fedmask-local", DIGITS)))
    fedpm = grid_points("fedpm", default_config("fedpm", DIGITS))
    assert {(c.share, c.prune_rho, c.personal_head, c.final_local_epochs) for c in fedpm} == {(1.0, 1.0, False, 0)}
    with pytest.raises(ValueError, match="at most"):
        draw_trials("fedpm", default_config("fedpm", DIGITS), 14)


def test_the_chosen_config_is_the_validation_argmax(digits: FederatedDataset) -> None:
    scores = iter([0.5, 0.8, float("nan"), 0.8, 0.7])

    def fake_run(cfg: VariantConfig, *args: Any, **kwargs: Any) -> SimResult:
        return _result(test=0.99, val=next(scores))  # test is high everywhere: it must not matter

    record = tune("fedmask", DIGITS, digits, _spec(digits), trials=5, rounds=2, run=fake_run)
    assert [t.index for t in record.trials] == [1, 2, 3, 4, 5]
    assert record.chosen == 1  # 0.8 first reached by trial 2; the tie with trial 4 keeps the earlier
    assert record.config == record.trials[1].config
    assert "test" not in json.dumps(record.to_json())  # a tuning file never records test accuracy
    dummy = record.trials[0].config
    assert choose([Trial(1, dummy, float("nan"), 0.0), Trial(2, dummy, 0.1, 0.0)]) == 1


def test_presets_file_round_trips_through_tuned_config(digits: FederatedDataset, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    record = tune("fedpm", DIGITS, digits, _spec(digits), trials=2, rounds=2)
    assert record.budget["trials"] == 2 and record.budget["rounds"] == 2 and record.budget["seed"] == 100
    write_record(record, tuned_path("digits", "fedpm", root=tmp_path))
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    loaded = tuned_config("digits", "fedpm")
    assert loaded.config == record.config
    assert loaded.origin.endswith("digits/fedpm.json")
    missing = tuned_config("digits", "fedavg")
    assert missing.config == default_config("fedavg", DIGITS) and missing.origin.startswith("default")
    # Another split without a file of its own takes the task's default-split presets, and says so.
    other = load_tuned("digits", "fedpm", DIGITS, partition="dirichlet0.5", root=tmp_path)
    assert other.config == record.config and other.origin.endswith("digits/fedpm.json")
    write_record(record, tuned_path("digits", "fedpm", "dirichlet0.5", root=tmp_path))
    own = load_tuned("digits", "fedpm", DIGITS, partition="dirichlet0.5", root=tmp_path)
    assert own.origin.endswith("digits-dirichlet0.5/fedpm.json")


def test_config_knobs_are_checked() -> None:
    base = default_config("fedmask", DIGITS)
    assert base.with_(lr=3.0, prune_rho=0.5).train.lr == 3.0
    with pytest.raises(ValueError, match="unknown knobs"):
        base.with_(learning_rate=3.0)
    with pytest.raises(ValueError, match="another variant"):
        VariantConfig.from_json(default_config("fedpm", DIGITS).to_json(), base)
    assert VariantConfig.from_json({"share": 0.25}, base).share == 0.25  # missing knobs: the default's


# -- seeds and spread ------------------------------------------------------------------------
def test_summary_mean_and_sample_std() -> None:
    hist = [[{"round": 1, "uplink_mb": 1.0, "downlink_mb": 1.0, "accuracy": a}] for a in (0.2, 0.4, 0.6)]
    runs = {s: _result(t, v, up=u, history=h)
            for s, t, v, u, h in zip((0, 1, 2), (0.5, 0.7, 0.9), (0.6, 0.6, 0.9), (1e6, 2e6, 3e6), hist, strict=True)}
    s = summarize("fedmask", default_config("fedmask", DIGITS), "default", runs)
    assert s.seeds == [0, 1, 2]
    assert s.test_mean == pytest.approx(0.7) and s.test_std == pytest.approx(0.2)  # ddof=1
    assert s.val_mean == pytest.approx(0.7) and s.val_std == pytest.approx(math.sqrt(0.03))
    assert s.uplink_mb == pytest.approx(2.0) and s.downlink_mb == pytest.approx(0.002)
    assert s.curve == [{"round": 1.0, "mb": 2.0, "accuracy_mean": pytest.approx(0.4),
                        "accuracy_std": pytest.approx(0.2)}]
    assert math.isnan(mean_std([0.5])[1])  # one seed: no spread measured


def test_beats_only_beyond_the_larger_spread() -> None:
    c = compare("A", 0.80, 0.05, "B", 0.70, 0.04)
    assert c.beats and c.text.startswith("A beats B")
    assert compare("B", 0.70, 0.04, "A", 0.80, 0.05).text.startswith("A beats B")  # order of arguments
    assert not compare("A", 0.80, 0.02, "B", 0.70, 0.12).beats  # B's spread covers the gap
    assert not compare("A", 0.75, 0.25, "B", 0.5, 0.0).beats   # a gap equal to the spread is not enough
    tie = compare("A", 0.80, float("nan"), "B", 0.50, float("nan"))
    assert not tie.beats and "within spread" in tie.text and "no spread" in tie.text
    summaries = [summarize(n, default_config("fedavg", DIGITS), "d", {0: _result(m - d, 0.5), 1: _result(m + d, 0.5)})
                 for n, m, d in (("low", 0.5, 0.01), ("high", 0.9, 0.01), ("mid", 0.88, 0.05))]
    texts = [c.text for c in comparisons(summaries)]
    assert texts[0].startswith("high and mid are within spread")
    assert texts[1].startswith("high beats low") and texts[2].startswith("mid beats low")


# -- fedpm: one global model -----------------------------------------------------------------
def test_fedpm_broadcast_gives_every_device_the_same_mask(digits: FederatedDataset, tmp_path: Path) -> None:
    cfg = default_config("fedpm", DIGITS).with_(local_epochs=1)
    masks, results = {}, {}
    for broadcast in (True, False):
        save = tmp_path / str(broadcast)
        results[broadcast] = run_variant(cfg.with_(broadcast_final=broadcast), digits, _spec(digits), rounds=2,
                                         sample_rate=0.5, seed=100, save_devices=save)
        masks[broadcast] = [_mask(f) for f in sorted(save.glob("*.npz"))]
    on, off = results[True], results[False]
    assert off.extra["final_broadcast_bytes"] == 0 < on.extra["final_broadcast_bytes"]
    assert on.downlink_bytes == off.downlink_bytes + on.extra["final_broadcast_bytes"]  # counted on the downlink
    assert on.extra["downloads"] == off.extra["downloads"] + 3  # the 3 of 6 devices the last round left out
    assert len(masks[True]) == 6 and all(np.array_equal(m, masks[True][0]) for m in masks[True])
    assert not all(np.array_equal(m, masks[False][0]) for m in masks[False])  # the broadcast is what does it


def _mask(path: Path) -> np.ndarray:
    spec = DeviceRuntime.read_spec(path)
    dev = DeviceRuntime(path.stem, spec, default_config("fedpm", DIGITS).fedmask_config(),
                        (np.zeros(0), np.zeros(0)), seed=spec.seed)
    dev.load(path)
    bits: np.ndarray = dev.model.mask_bits()
    return bits


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_tune_writes_the_presets_file(tmp_path: Path) -> None:
    out = tmp_path / "fedavg.json"
    res = CliRunner().invoke(main, ["tune", *SMALL, "--method", "fedavg", "--trials", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    raw = json.loads(out.read_text())
    assert raw["task"] == "digits" and raw["variant"] == "fedavg" and raw["partition"]["key"] is None
    assert raw["budget"] == {"trials": 2, "rounds": 2, "preset_rounds": DIGITS.rounds, "seed": 100, "devices": 6,
                             "width": 16, "sample_rate": DIGITS.sample_rate}
    assert [t["trial"] for t in raw["trials"]] == [1, 2] and raw["trials"][0]["default"]
    assert all(t["wall_seconds"] > 0 and 0 <= t["validation_accuracy"] <= 1 for t in raw["trials"])
    best = max(raw["trials"], key=lambda t: t["validation_accuracy"])
    assert raw["chosen"]["config"] == best["config"]
    assert "chosen: trial" in res.output


def test_cli_experiment_variants_over_seeds(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["experiment", *SMALL, "--variants", "standalone,fedpm", "--seeds", "2",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ("results.csv", "results.md", "results.json", "accuracy_vs_communication.png"):
        assert (tmp_path / name).stat().st_size > 0
    raw = json.loads((tmp_path / "results.json").read_text())
    assert [v["variant"] for v in raw["variants"]] == ["standalone", "fedpm"]
    assert all(v["seeds"] == [0, 1] and len(v["per_seed"]) == 2 for v in raw["variants"])
    fedpm = raw["variants"][1]
    assert fedpm["test_mean"] == pytest.approx(np.mean([s["test_accuracy"] for s in fedpm["per_seed"]]))
    assert fedpm["curve"] and fedpm["downlink_bits_per_param"] > 0
    assert len(raw["statements"]["test"]) == 1
    assert "±" in (tmp_path / "results.md").read_text()
    bad = CliRunner().invoke(main, ["experiment", *SMALL, "--variants", "fedpm", "--lam", "1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "tuned config" in bad.output


def test_resume_reuses_identical_trials_and_runs_only_new_ones(digits: FederatedDataset) -> None:
    calls: list[VariantConfig] = []

    def counting_run(cfg: VariantConfig, *args: object, **kw: object) -> SimResult:
        calls.append(cfg)
        return run_variant(cfg, *args, **kw)  # type: ignore[arg-type]

    first = tune("fedavg", DIGITS, digits, _spec(digits), trials=2, rounds=2, run=counting_run)
    assert len(calls) == 2
    more = tune("fedavg", DIGITS, digits, _spec(digits), trials=3, rounds=2, run=counting_run,
                resume=first.to_json())
    assert len(calls) == 3  # trials 1-2 reused, only trial 3 ran
    assert [t.validation_accuracy for t in more.trials[:2]] == [t.validation_accuracy for t in first.trials]
    other_budget = tune("fedavg", DIGITS, digits, _spec(digits), trials=2, rounds=3, run=counting_run,
                        resume=first.to_json())
    assert len(calls) == 5 and other_budget.budget["rounds"] == 3  # another budget: nothing reused


def test_cli_simulate_runs_a_named_variant_with_its_presets() -> None:
    res = CliRunner().invoke(main, ["simulate", "--task", "digits", "--variant", "fedpm", "--devices", "6",
                                    "--rounds", "2", "--width", "16", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert payload["method"] == "fedpm" and payload["merge"] == "agreement"
    assert payload["extra"]["config"]["share"] == 1.0 and payload["extra"]["config"]["prune_rho"] == 1.0
