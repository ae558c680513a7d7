"""The clock simulator (shared/sim/rhythm.py) and the async buffer it shares with the aggregator."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.async_buffer import AsyncBuffer, staleness_weight, weighted_merge
from shared.data import FederatedDataset, load_task
from shared.device import FedMaskConfig
from shared.merge_rules import MergeContext, get_rule
from shared.models import ModelSpec
from shared.presets import model_spec, tuned_config
from shared.sim.clock import EventQueue
from shared.sim.rhythm import RhythmConfig, run_rhythm
from shared.sim.rhythm_fleet import FleetTiming
from shared.sim.vector_learner import VectorConfig, VectorFedMask
from tests.random_fleet import random_fleet


def test_events_run_in_time_order_and_ties_in_scheduling_order() -> None:
    q = EventQueue()
    q.at(2.0, "b")
    q.at(1.0, "a")
    q.at(2.0, "c")
    assert [q.pop().kind for _ in range(3)] == ["a", "b", "c"]
    assert q.now == 2.0
    with pytest.raises(ValueError):
        q.at(1.5, "past")




@pytest.mark.parametrize("rule", ["paper", "head", "body"])
def test_equal_weights_are_the_pipeline_rule_bit_for_bit(rule: str) -> None:
    s, m, ctx = random_fleet(9, 203, seed=1)
    for w in (1.0, 0.5 ** 0.5):
        got = weighted_merge(get_rule(rule), ctx, s, m, np.full(9, w), rows=9)
        assert np.array_equal(got, get_rule(rule).merge(s, m, ctx))


def test_a_heavier_vote_wins_and_nothing_leaves_the_structure() -> None:
    s, m, ctx = random_fleet(3, 64, seed=2)
    s[:] = 0xFF
    m[0], m[1], m[2] = 0xFF, 0x00, 0x00
    out = weighted_merge(get_rule("paper"), ctx, s, m, np.array([3.0, 1.0, 1.0]), rows=3)
    assert (out == 0xFF).all()  # 3 > 1 + 1
    out = weighted_merge(get_rule("paper"), ctx, s, m, np.array([1.0, 1.0, 1.0]), rows=3)
    assert (out == 0).all()
    s2, m2, _ = random_fleet(5, 64, seed=3)
    out = weighted_merge(get_rule("paper"), ctx, s2, m2, np.arange(1.0, 6.0), rows=5)
    assert not (out & ~s2).any()


def test_staleness_weights() -> None:
    assert staleness_weight("constant", 7) == 1.0
    assert staleness_weight("sqrt", 3) == 0.5
    with pytest.raises(ValueError):
        staleness_weight("linear", 1)


def _buffer_fleet(n: int = 4) -> tuple[dict[str, np.ndarray], list[np.ndarray], MergeContext]:
    s, m, ctx = random_fleet(n, 40, seed=4)
    return {f"d{i}": s[i] for i in range(n)}, list(m), ctx


def test_k1_flushes_every_update_and_k3_every_third() -> None:
    structures, masks, ctx = _buffer_fleet()
    rule = get_rule("paper")
    for k, flushes in ((1, 6), (3, 2)):
        buf = AsyncBuffer(k=k, max_staleness=10)
        got = 0
        for i in range(6):
            d = f"d{i % 4}"
            buf.store(d, masks[i % 4], base=buf.version, update_id=f"u{i}")
            if buf.due:
                got += 1
                f = buf.flush(rule, ctx, structures)
                assert f.version == got and set(f.masks) <= set(structures)
        assert got == flushes


def test_stale_masks_of_other_boards_do_not_vote_but_a_stale_buffered_update_is_merged() -> None:
    structures, masks, ctx = _buffer_fleet()
    rule = get_rule("paper")
    buf = AsyncBuffer(k=1, max_staleness=2)
    buf.store("d0", masks[0], base=0, update_id="a")
    buf.flush(rule, ctx, structures)  # version 1
    for i in range(3):  # d1 keeps the version moving; d0's update (base 0) ages
        buf.store("d1", masks[1], base=buf.version, update_id=f"b{i}")
        f = buf.flush(rule, ctx, structures)
    assert f.voters == 1 and f.stale_excluded == 1  # d0: tau 3 > 2
    buf.store("d2", masks[2], base=0, update_id="c")  # tau 4, but its own update: merged
    f = buf.flush(rule, ctx, structures)
    assert "d2" in f.masks and f.taus["d2"] == 4 and f.voters == 2  # d2 + d1 (tau 1); d0 still out


def test_duplicates_are_ignored_and_a_buffered_update_is_replaced_once() -> None:
    structures, masks, ctx = _buffer_fleet()
    buf = AsyncBuffer(k=3, max_staleness=5)
    assert buf.store("d0", masks[0], 0, "x") == "stored"
    assert buf.store("d0", masks[0], 0, "x") == "duplicate"
    assert buf.store("d0", masks[1] & structures["d0"], 0, "y") == "replaced"
    assert not buf.due
    buf.store("d1", masks[1], 0, "z")
    f = buf.flush(get_rule("paper"), ctx, structures)
    assert sorted(f.masks) == ["d0", "d1"] and buf.counts["stored"] == 3 and buf.counts["duplicate"] == 1


@pytest.fixture(scope="module")
def learner_cfg() -> VectorConfig:
    return VectorConfig(hidden=8, test_per_class=1, val_per_class=1)


def _run(mode: str, n: int, cfg: VectorConfig, **kw: object) -> tuple[object, FleetTiming]:
    learner = VectorFedMask(n, cfg)
    timing = FleetTiming.mixed(learner.device_ids(), 0.3, 5.0, seed=1)
    return run_rhythm(learner, timing, RhythmConfig(mode=mode, record=True, **kw)), timing  # type: ignore[arg-type]


def test_sync_all_waits_for_every_board(learner_cfg: VectorConfig) -> None:
    res, _ = _run("sync", 20, learner_cfg, merges=4)
    assert res.merges == 4  # type: ignore[attr-defined]
    for st in res.per_device.values():  # type: ignore[attr-defined]
        assert st["sent"] == st["merged"] == st["masks"] == 4


@pytest.mark.parametrize("mode,kw", [("quorum", {}), ("async", {"k": 4, "max_staleness": 3}),
                                     ("async", {"k": 1, "staleness": "sqrt"})])
def test_no_update_lost_or_counted_twice(mode: str, kw: dict[str, object], learner_cfg: VectorConfig) -> None:
    res, _ = _run(mode, 20, learner_cfg, merges=15, **kw)
    c = res.counters  # type: ignore[attr-defined]
    sent = sum(st.get("sent", 0) for st in res.per_device.values())  # type: ignore[attr-defined]
    merged = sum(st.get("merged", 0) for st in res.per_device.values())  # type: ignore[attr-defined]
    assert sent == len(res.arrivals) and sent > 0  # type: ignore[attr-defined]
    if mode == "quorum":
        g = c.get
        assert g("updates:duplicate", 0) == 0 and g("updates:not_sampled", 0) == 0 and g("late:parked", 0) > 0
        # each update has one fate: stored, carried at once, parked (then carried, expired, replaced or
        # still parked at the end), or dropped
        assert sent == g("updates:stored", 0) + g("late:carried", 0) - g("late:from_park", 0) \
            + g("late:parked", 0) + g("late:dropped", 0)
        assert res.still_parked == g("late:parked", 0) - g("late:from_park", 0) - g("late:expired", 0) \
            - g("late:replaced", 0)  # type: ignore[attr-defined]
        assert merged == g("updates:stored", 0) + g("late:carried", 0)
    else:  # every stored update merged, or replaced by a newer one of its board (one mask for both)
        assert c["stored"] == sent and merged == c["merged"] == sent - c.get("replaced", 0)
        for st in res.per_device.values():  # type: ignore[attr-defined]
            assert st.get("masks", 0) == st.get("merged", 0)  # a merged mask for every merge it was in


def test_the_run_is_deterministic_and_the_clock_never_sleeps(learner_cfg: VectorConfig) -> None:
    a, _ = _run("async", 30, learner_cfg, k=3, merges=20)
    b, _ = _run("async", 30, learner_cfg, k=3, merges=20)
    assert a.arrivals == b.arrivals and a.sim_seconds > 10 * a.wall_seconds  # type: ignore[attr-defined]
    assert all(np.array_equal(a.masks[d], b.masks[d]) for d in a.masks)  # type: ignore[attr-defined]


def test_sync_all_gives_the_synchronous_simulators_masks(tmp_path: Path) -> None:
    from shared.data import load_task
    from shared.device import DeviceRuntime, FedMaskConfig
    from shared.presets import model_spec, preset
    from shared.sim.fedmask import run_fedmask
    from shared.sim.torch_learner import TorchFedMask

    data = load_task("digits", num_devices=4, seed=0, cache_dir=tmp_path / "data")
    spec = model_spec("digits", width=16, seed=0)
    cfg = FedMaskConfig(train=preset("digits").mask_train, local_epochs=1)
    run_fedmask(data, spec, cfg, rounds=2, sample_rate=1.0, seed=0, merge="head", save_dir=tmp_path / "dev")
    learner = TorchFedMask(data, spec, cfg, seed=0)
    timing = FleetTiming.mixed(learner.device_ids(), 0.5, 5.0)
    res = run_rhythm(learner, timing, RhythmConfig(mode="sync", merges=2, rule="head"))
    assert res.merges == 2 and math.isfinite(res.sim_seconds)
    for d in learner.device_ids():
        ref = DeviceRuntime(d, spec, cfg, (np.zeros((0, 64), np.float32), np.zeros(0, np.int64)), 0)
        ref.load(tmp_path / "dev" / f"{d}.npz")
        assert ref.mask_version == learner.devices[d].mask_version == 2
        assert np.array_equal(ref.model.mask_bits(), learner.devices[d].model.mask_bits())


def test_replaying_the_recorded_arrival_order_gives_the_same_masks(learner_cfg: VectorConfig) -> None:
    from shared.sim.rhythm import replay_async

    learner = VectorFedMask(25, learner_cfg)
    timing = FleetTiming.mixed(learner.device_ids(), 0.3, 20.0, seed=2)
    cfg = RhythmConfig(mode="async", k=3, max_staleness=4, staleness="sqrt", merges=30, record=True)
    res = run_rhythm(learner, timing, cfg)
    again = replay_async(res, cfg, learner.structures(), learner.ctx)
    assert sorted(again) == sorted(res.masks)
    assert all(np.array_equal(again[d], res.masks[d]) for d in res.masks)


def _agree_fleet(tmp_path: Path, n: int = 4) -> tuple[FederatedDataset, ModelSpec, FedMaskConfig]:
    """fedmask-agree's model and device config on a few digits devices, one local epoch a task."""
    cfg = tuned_config("digits", "fedmask-agree").config
    data = load_task("digits", num_devices=n, seed=0, cache_dir=tmp_path / "data")
    spec = model_spec("digits", width=16, seed=0).with_(personal_head=cfg.personal_head)
    return data, spec, replace(cfg.fedmask_config(), local_epochs=1)


def test_sync_all_under_agreement_gives_the_synchronous_simulators_scores(tmp_path: Path) -> None:
    """fedmask-agree's devices (sampled uploads, theta down as q4, blended into the scores): sync-all in
    the clock simulator is run_fedmask's rounds, every score bit for bit."""
    from shared.device import DeviceRuntime
    from shared.sim.fedmask import run_fedmask
    from shared.sim.torch_learner import TorchFedMask

    data, spec, cfg = _agree_fleet(tmp_path)
    run_fedmask(data, spec, cfg, rounds=2, sample_rate=1.0, seed=0, merge="agreement", save_dir=tmp_path / "dev")
    learner = TorchFedMask(data, spec, cfg, seed=0)
    assert learner.downlink == "q4"
    res = run_rhythm(learner, FleetTiming.mixed(learner.device_ids(), 0.5, 5.0),
                     RhythmConfig(mode="sync", merges=2, rule="agreement"))
    assert res.merges == 2
    for d in learner.device_ids():
        ref = DeviceRuntime(d, spec, cfg, (np.zeros((0, 64), np.float32), np.zeros(0, np.int64)), 0)
        ref.load(tmp_path / "dev" / f"{d}.npz")
        assert ref.mask_version == learner.devices[d].mask_version == 2
        assert ref.model.scores_flat().tobytes() == learner.devices[d].model.scores_flat().tobytes()


def test_async_under_agreement_replays_to_the_same_theta(tmp_path: Path) -> None:
    from shared.sim.rhythm import replay_async
    from shared.sim.torch_learner import TorchFedMask

    data, spec, cfg = _agree_fleet(tmp_path)
    learner = TorchFedMask(data, spec, cfg, seed=0)
    rc = RhythmConfig(mode="async", rule="agreement", k=2, max_staleness=3, staleness="sqrt", merges=4, record=True)
    res = run_rhythm(learner, FleetTiming.mixed(learner.device_ids(), 0.5, 5.0, seed=1), rc)
    assert res.merges >= 4 and res.masks and all(m.dtype == np.float32 for m in res.masks.values())
    again = replay_async(res, rc, learner.structures(), learner.ctx)
    assert sorted(again) == sorted(res.masks)
    assert all(again[d].tobytes() == res.masks[d].tobytes() for d in res.masks)
    # Every merged board applied its newest theta (as q4) before the run ended: the version moved.
    assert all(learner.devices[d].mask_version > 0 for d in res.masks)


def test_a_learner_must_take_what_the_rule_sends(learner_cfg: VectorConfig, tmp_path: Path) -> None:
    from shared.sim.torch_learner import TorchFedMask

    vector = VectorFedMask(6, learner_cfg)
    timing = FleetTiming.mixed(vector.device_ids(), 0.5, 5.0)
    with pytest.raises(ValueError, match="agreement"):
        run_rhythm(vector, timing, RhythmConfig(mode="async", rule="agreement"))
    data, spec, cfg = _agree_fleet(tmp_path)
    agree = TorchFedMask(data, spec, cfg, seed=0)
    with pytest.raises(ValueError, match="agreement"):
        run_rhythm(agree, FleetTiming.mixed(agree.device_ids(), 0.5, 5.0), RhythmConfig(mode="async", rule="paper"))
