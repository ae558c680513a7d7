"""Variants over several seeds: mean and spread, and only the comparisons the spread supports.

Each seed builds its own data partition and model seed (as `fedmask simulate --seed` does), so
the spread covers both the partition and the training randomness. "A beats B" is said only when
mean_A - mean_B > max(std_A, std_B) (sample std, ddof=1); otherwise A and B are within spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.data import FederatedDataset
from shared.models import ModelSpec
from shared.sim.result import Progress, SimResult, clean_json
from shared.sim.variants import VariantConfig, run_variant

# setup(seed) -> the seed's data and model spec; progress_for(variant, seed) -> a round callback
Setup = Callable[[int], tuple[FederatedDataset, ModelSpec]]
ProgressFor = Callable[[str, int], Progress | None]


_COMPUTE = ("train_flops", "dense_train_flops", "dense_eval_accuracy", "readjust_rounds", "mask_moves")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN with one value: no spread measured)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
    return float(arr.mean()), std


@dataclass
class VariantSummary:
    variant: str
    config: dict[str, Any]
    origin: str                          # where the config came from (tuning file or default)
    seeds: list[int]
    test_mean: float
    test_std: float
    val_mean: float
    val_std: float
    uplink_bits_per_param: float         # mean over seeds of SimResult.uplink_bits_per_param
    downlink_bits_per_param: float       # mean of 8 * downlink_bytes / (params * downloads)
    uplink_mb: float
    downlink_mb: float
    per_seed: list[dict[str, Any]] = field(default_factory=list)  # seed, accuracies, MB, history
    curve: list[dict[str, float]] = field(default_factory=list)   # per eval round: mean MB, mean/std acc

    @property
    def total_mb(self) -> float:
        return self.uplink_mb + self.downlink_mb

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = clean_json({**self.__dict__, "total_mb": self.total_mb})
        return out


def summarize(variant: str, config: VariantConfig, origin: str, runs: dict[int, SimResult]) -> VariantSummary:
    """One variant's runs (seed -> result) reduced to mean +- std, with the mean curve."""
    seeds = sorted(runs)
    rs = [runs[s] for s in seeds]
    test_mean, test_std = mean_std([r.personalized_accuracy for r in rs])
    val_mean, val_std = mean_std([r.validation_accuracy for r in rs])
    per_seed = [{"seed": s, "test_accuracy": r.personalized_accuracy, "validation_accuracy": r.validation_accuracy,
                 "uplink_mb": r.uplink_bytes / 1e6, "downlink_mb": r.downlink_bytes / 1e6,
                 "wall_seconds": r.wall_seconds, "history": r.history,
                 # strategies (shared/sim/strategy_run.py) also count training compute
                 **{k: r.extra[k] for k in _COMPUTE if k in r.extra}} for s, r in zip(seeds, rs, strict=True)]
    return VariantSummary(
        variant=variant, config=config.to_json(), origin=origin, seeds=seeds,
        test_mean=test_mean, test_std=test_std, val_mean=val_mean, val_std=val_std,
        uplink_bits_per_param=float(np.mean([r.uplink_bits_per_param for r in rs])),
        downlink_bits_per_param=float(np.mean([r.extra.get("downlink_bits_per_param", math.nan) for r in rs])),
        uplink_mb=float(np.mean([r.uplink_bytes for r in rs])) / 1e6,
        downlink_mb=float(np.mean([r.downlink_bytes for r in rs])) / 1e6,
        per_seed=per_seed, curve=mean_curve(rs))


def mean_curve(results: Sequence[SimResult]) -> list[dict[str, float]]:
    """Per evaluated round that every seed evaluated: mean cumulative MB, mean and std accuracy."""
    by_round: list[dict[int, dict[str, float]]] = [
        {int(h["round"]): h for h in r.history if "accuracy" in h} for r in results]
    rounds = sorted(set.intersection(*(set(b) for b in by_round))) if by_round else []
    curve = []
    for rnd in rounds:
        pts = [b[rnd] for b in by_round]
        mean, std = mean_std([p["accuracy"] for p in pts])
        curve.append({"round": float(rnd), "mb": float(np.mean([p["uplink_mb"] + p["downlink_mb"] for p in pts])),
                      "accuracy_mean": mean, "accuracy_std": std})
    return curve


def run_seeds(variants: dict[str, tuple[VariantConfig, str]], setup: Setup, seeds: Sequence[int], *, rounds: int,
              sample_rate: float, eval_every: int = 0, progress_for: ProgressFor | None = None,
              on_result: Callable[[str, int, SimResult], None] | None = None) -> list[VariantSummary]:
    """Every variant (name -> (config, origin)) on every seed's data; one summary per variant."""
    runs: dict[str, dict[int, SimResult]] = {v: {} for v in variants}
    for seed in seeds:
        data, spec = setup(seed)  # built once per seed: every variant sees the same partition
        for name, (cfg, _) in variants.items():
            bar = progress_for(name, seed) if progress_for else None
            r = run_variant(cfg, data, spec, rounds=rounds, sample_rate=sample_rate, seed=seed,
                            eval_every=eval_every, progress=bar)
            runs[name][seed] = r
            if on_result:
                on_result(name, seed, r)
    return [summarize(name, cfg, origin, runs[name]) for name, (cfg, origin) in variants.items()]


@dataclass(frozen=True)
class Comparison:
    first: str       # the higher mean
    second: str
    difference: float
    spread: float    # max(std_first, std_second)
    beats: bool

    @property
    def text(self) -> str:
        if self.beats:
            return (f"{self.first} beats {self.second} (mean difference {self.difference:.4f} > "
                    f"max std {self.spread:.4f})")
        why = "no spread measured" if math.isnan(self.spread) else (
            f"mean difference {self.difference:.4f} <= max std {self.spread:.4f}")
        return f"{self.first} and {self.second} are within spread ({why})"


def compare(a: str, mean_a: float, std_a: float, b: str, mean_b: float, std_b: float) -> Comparison:
    """A beats B only when mean_A - mean_B > max(std_A, std_B); an unmeasured spread never supports it."""
    if mean_b > mean_a:
        a, mean_a, std_a, b, mean_b, std_b = b, mean_b, std_b, a, mean_a, std_a
    spread = max(std_a, std_b) if not (math.isnan(std_a) or math.isnan(std_b)) else float("nan")
    diff = mean_a - mean_b
    return Comparison(a, b, diff, spread, beats=not math.isnan(spread) and diff > spread)


def comparisons(summaries: Sequence[VariantSummary], metric: str = "test") -> list[Comparison]:
    """Every pair of variants on test (or "val") accuracy, best mean first."""
    ranked = sorted(summaries, key=lambda s: -_finite(_metric(s, metric)[0]))
    out = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            out.append(compare(a.variant, *_metric(a, metric), b.variant, *_metric(b, metric)))
    return out


def _metric(s: VariantSummary, metric: str) -> tuple[float, float]:
    if metric == "test":
        return s.test_mean, s.test_std
    if metric == "val":
        return s.val_mean, s.val_std
    raise ValueError(f"metric is test or val, not {metric!r}")


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -math.inf
