"""`fedmask bench byzantine`: how far Byzantine boards move the honest devices' accuracy.

A share of the fleet (default 10%: 1 of activity's 10 boards, 10 of MNIST's 100) prunes and says
hello honestly, then sends a poisoned mask every round (shared/sim/byzantine.py: all zeros, all ones,
or its trained mask inverted). Each method runs clean and under each attack on the same seeds (same
data split, model, sampling and Byzantine boards), so a seed's shift is attacked minus clean.

Methods: merge rules under the task preset's FedMask config (the preset's rule is `head`; `robust` is
the bounded-influence rule, shared/merge_rules.py) and named variants with their tuned configs
(`fedmask-local`, `fedmask-agree`). Reported per method, mean ± std over seeds: the honest devices'
clean accuracy, the shift under each attack, and the clean cost against the first method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.data import FederatedDataset, load_task
from shared.models import ModelSpec
from shared.presets import TaskPreset, preset, tuned_config
from shared.sim.byzantine import ATTACKS, Adversary, honest_mean, pick_byzantine
from shared.sim.variants import MASK_VARIANTS, VariantConfig, default_config, run_variant

CLEAN = "clean"


@dataclass(frozen=True)
class ByzantineBenchConfig:
    task: str
    seeds: tuple[int, ...]
    rounds: int
    share: float = 0.1
    methods: tuple[str, ...] = ("head", "robust")  # merge rules (task preset) or named mask variants
    attacks: tuple[str, ...] = ATTACKS


@dataclass(frozen=True)
class Run:
    method: str
    condition: str  # "clean" or an attack
    seed: int


def method_config(task: str, method: str, p: TaskPreset) -> VariantConfig:
    """A merge rule under the preset's FedMask config, or a named variant's tuned config."""
    if method in MASK_VARIANTS:
        return tuned_config(task, method).config
    return default_config("fedmask", p).with_(merge=method)


def plan(cfg: ByzantineBenchConfig) -> list[Run]:
    """Seed-major, so a partial run already holds complete seeds."""
    return [Run(m, c, s) for s in cfg.seeds for m in cfg.methods for c in (CLEAN, *cfg.attacks)]


def run_bench(cfg: ByzantineBenchConfig, *, on_run: Callable[[Run, dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
    p = preset(cfg.task)
    configs = {m: method_config(cfg.task, m, p) for m in cfg.methods}  # unknown names fail before any run
    setups: dict[int, tuple[FederatedDataset, ModelSpec]] = {}
    rows: list[dict[str, Any]] = []
    for run in plan(cfg):
        if run.seed not in setups:
            data = load_task(cfg.task, num_devices=p.devices, seed=run.seed, **p.data_options)  # type: ignore[arg-type]
            setups = {run.seed: (data, ModelSpec(p.arch, data.input_shape, data.num_classes, width=p.width,
                                                 seed=run.seed))}
        data, spec = setups[run.seed]
        bad = pick_byzantine([d.device_id for d in data.devices], cfg.share, run.seed)
        adversary = None if run.condition == CLEAN else Adversary(bad, run.condition)
        r = run_variant(configs[run.method], data, spec, rounds=cfg.rounds, sample_rate=p.sample_rate,
                        seed=run.seed, adversary=adversary)
        before = r.extra.get("per_device_accuracy_before_final", {})
        row = {"method": run.method, "condition": run.condition, "seed": run.seed, "byzantine": sorted(bad),
               "honest_accuracy": honest_mean(r.per_device_accuracy, bad),
               "honest_accuracy_before_final": honest_mean(before, bad) if before else None,
               "all_accuracy": r.personalized_accuracy, "wall_seconds": r.wall_seconds}
        rows.append(row)
        if on_run is not None:
            on_run(run, row)
    return {"config": {"task": cfg.task, "seeds": list(cfg.seeds), "rounds": cfg.rounds, "share": cfg.share,
                       "methods": list(cfg.methods), "attacks": list(cfg.attacks), "devices": p.devices,
                       "sample_rate": p.sample_rate, "final_local_epochs": {m: c.final_local_epochs
                                                                           for m, c in configs.items()}},
            "runs": rows, "summary": summarize(rows, cfg.methods, cfg.attacks)}


def _spread(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def summarize(rows: list[dict[str, Any]], methods: Sequence[str], attacks: Sequence[str]) -> dict[str, Any]:
    """Per method: clean honest accuracy, shift per attack (attacked - clean, per seed), clean cost
    against the first method (per seed). Only seeds with both runs count."""
    acc = {(r["method"], r["condition"], r["seed"]): r["honest_accuracy"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out: dict[str, Any] = {}
    for m in methods:
        clean = [acc[m, CLEAN, s] for s in seeds if (m, CLEAN, s) in acc]
        if not clean:
            continue
        entry: dict[str, Any] = {"clean": _spread(clean), "shift": {}}
        for a in attacks:
            d = [acc[m, a, s] - acc[m, CLEAN, s] for s in seeds if (m, a, s) in acc and (m, CLEAN, s) in acc]
            if d:
                entry["shift"][a] = _spread(d)
        base = methods[0]
        cost = [acc[m, CLEAN, s] - acc[base, CLEAN, s] for s in seeds if (m, CLEAN, s) in acc and
                (base, CLEAN, s) in acc]
        if m != base and cost:
            entry["clean_vs_" + base] = _spread(cost)
        out[m] = entry
    return out


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per method, points of honest accuracy (x100)."""
    cfg, summary = result["config"], result["summary"]
    attacks = cfg["attacks"]

    def pts(s: dict[str, float] | None, sign: bool = False) -> str:
        if s is None:
            return "-"
        return f"{100 * s['mean']:{'+' if sign else ''}.2f} ± {100 * s['std']:.2f}"

    base = cfg["methods"][0]
    head = ["method", "clean honest acc (%)", *(f"{a} shift (pts)" for a in attacks), f"clean vs {base} (pts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in summary.items():
        cells = [m, pts(e["clean"]), *(pts(e["shift"].get(a), True) for a in attacks),
                 pts(e.get("clean_vs_" + base), True) if m != base else "0"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = len(cfg["seeds"])
    lines.append(f"\n{cfg['task']}: {cfg['devices']} devices, {cfg['share']:.0%} Byzantine, {cfg['rounds']} rounds, "
                 f"sample rate {cfg['sample_rate']}, {seeds} seeds (mean ± std over seeds; shift = attacked "
                 "- clean on the same seed, honest devices only)")
    return "\n".join(lines)
