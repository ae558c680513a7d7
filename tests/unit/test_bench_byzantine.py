"""`fedmask bench byzantine`'s bookkeeping (ops/bench/byzantine.py): the run plan and the summary's
per-seed differences, on hand-made rows (the runs themselves are the benchmark's, not the suite's)."""

from __future__ import annotations

import pytest

from ops.bench.byzantine import ByzantineBenchConfig, format_table, plan, summarize


def test_plan_is_seed_major_with_a_clean_run_per_method() -> None:
    cfg = ByzantineBenchConfig(task="mnist", seeds=(0, 1), rounds=2, methods=("head", "robust"), attacks=("zeros",))
    runs = [(r.seed, r.method, r.condition) for r in plan(cfg)]
    assert runs == [(0, "head", "clean"), (0, "head", "zeros"), (0, "robust", "clean"), (0, "robust", "zeros"),
                    (1, "head", "clean"), (1, "head", "zeros"), (1, "robust", "clean"), (1, "robust", "zeros")]


def _row(method: str, condition: str, seed: int, acc: float) -> dict[str, object]:
    return {"method": method, "condition": condition, "seed": seed, "honest_accuracy": acc}


def test_shifts_and_costs_are_paired_by_seed() -> None:
    rows = [_row("head", "clean", 0, 0.90), _row("head", "zeros", 0, 0.88),
            _row("head", "clean", 1, 0.80), _row("head", "zeros", 1, 0.79),
            _row("robust", "clean", 0, 0.91), _row("robust", "zeros", 0, 0.91),
            _row("robust", "clean", 1, 0.83)]  # robust zeros seed 1 missing: that seed's shift is left out
    s = summarize(rows, ("head", "robust"), ("zeros",))  # type: ignore[arg-type]
    assert s["head"]["clean"]["mean"] == pytest.approx(0.85)
    assert s["head"]["shift"]["zeros"]["mean"] == pytest.approx(-0.015)
    assert s["head"]["shift"]["zeros"]["std"] == pytest.approx(0.00707, abs=1e-4)  # sample std of -0.02, -0.01
    assert s["robust"]["shift"]["zeros"] == {"mean": pytest.approx(0.0), "std": 0.0, "n": 1}
    assert s["robust"]["clean_vs_head"]["mean"] == pytest.approx(0.02)  # (0.01 + 0.03) / 2
    table = format_table({"config": {"task": "mnist", "seeds": [0, 1], "rounds": 2, "share": 0.1,
                                     "methods": ["head", "robust"], "attacks": ["zeros"], "devices": 100,
                                     "sample_rate": 0.2}, "summary": s})
    assert "| head | 85.00 ± 7.07 | -1.50 ± 0.71 | 0 |" in table
    assert "| robust | 87.00 ± 5.66 | +0.00 ± 0.00 | +2.00 ± 1.41 |" in table
