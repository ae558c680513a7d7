"""`fedmask bench rhythm`'s plumbing on a tiny fleet (the figures themselves are docs/results.md's)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ops.bench.rhythm import RhythmBench, first_time, format_table, plot, run_rhythm_bench, value_at


def test_curve_lookups() -> None:
    curve = [{"t": 0.0, "a": 0.1}, {"t": 5.0, "a": 0.4}, {"t": 9.0, "a": 0.6}]
    assert first_time(curve, "a", 0.4) == 5.0 and math.isinf(first_time(curve, "a", 0.7))
    assert value_at(curve, "a", 8.9) == 0.4 and value_at(curve, "a", 9.0) == 0.6


def test_a_tiny_grid_reports_every_mode(tmp_path: Path) -> None:
    b = RhythmBench(sizes=(8,), slow_shares=(0.5,), slowdowns=(5.0,), seeds=(0,), rounds=6, horizon_factor=1.0)
    res = run_rhythm_bench(b, say=lambda _s: None)
    (run,) = res["runs"]
    assert set(run["modes"]) == set(b.modes) and run["modes"]["sync"]["speedup"] == 1.0
    assert run["horizon"] <= run["modes"]["sync"]["sim_seconds"]
    for mode in ("quorum", "async", "async-sqrt"):
        m = run["modes"][mode]
        assert m["sim_seconds"] <= run["horizon"] + 1e-9 and m["curve"][-1]["t"] <= run["horizon"] + 1e-9
        assert m["by_profile"]["slow"]["boards"] == 4
    text = format_table(res["table"])
    assert text.count("\n") == 1 + len(b.modes)
    plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_a_variant_brings_its_rule_and_needs_the_torch_learner() -> None:
    assert RhythmBench(learner="torch", variant="fedmask-agree").merge_rule == "agreement"
    assert RhythmBench(rule="head").merge_rule == "head"
    with pytest.raises(ValueError, match="torch learner"):
        RhythmBench(variant="fedmask-agree")


def test_a_figure_missing_at_the_horizon_prints_as_na() -> None:
    # sync-all reaching the target in its first round with a horizon factor < 1: no sync point by then
    rows = run_rhythm_bench(RhythmBench(sizes=(8,), slow_shares=(0.5,), slowdowns=(5.0,), seeds=(0,), rounds=2,
                                        modes=("sync",), horizon_factor=1.0), say=lambda _s: None)["table"]
    rows[0]["accuracy_at_horizon"]["mean"] = None
    rows[0]["sync_slow_at_horizon"]["mean"] = math.nan
    line = format_table(rows).splitlines()[-1]
    assert line.count("n/a") == 2 and "| sync |" in line
