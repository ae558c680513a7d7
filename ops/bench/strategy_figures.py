"""Accuracy against cumulative uplink and against training compute, per method, from the results.json
files `fedmask experiment --variants` (or ops/bench/strategy_settings.py) wrote (issue 12; the FedDST
paper's upload-cap view and ZeroFL's compute view).

    python -m ops.bench.strategy_figures docs/figures/mnist-shards-strategies.png runs/a/results.json ...

Training FLOPs come from the runs' counted `train_flops`; a dense baseline run records none, and its
dense training FLOPs equal the `dense_train_flops` the strategies counted on the same seed (same
sampled devices, epochs, samples and layer sizes), which is what is drawn for it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def load(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        out.extend(json.loads(p.read_text())["variants"])
    return out


def flops_by_seed(variants: list[dict[str, Any]]) -> dict[str, list[float]]:
    dense: dict[int, float] = {}
    for v in variants:
        for s in v["per_seed"]:
            if s.get("dense_train_flops"):
                dense[s["seed"]] = max(dense.get(s["seed"], 0.0), float(s["dense_train_flops"]))
    return {v["variant"]: [float(s.get("train_flops") or dense.get(s["seed"], math.nan)) for s in v["per_seed"]]
            for v in variants}


def plot(path: Path, variants: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = flops_by_seed(variants)
    fig, (up, comp) = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, v in enumerate(variants):
        color, label = f"C{i}", f"{v['variant']} (n={len(v['seeds'])})"
        rounds = sorted({int(h["round"]) for s in v["per_seed"] for h in s["history"] if "accuracy" in h})
        xs, ms, sd = [], [], []
        for r in rounds:
            pts = [h for s in v["per_seed"] for h in s["history"] if int(h["round"]) == r and "accuracy" in h]
            xs.append(float(np.mean([h["uplink_mb"] for h in pts])))
            ms.append(float(np.mean([h["accuracy"] for h in pts])))
            sd.append(float(np.std([h["accuracy"] for h in pts], ddof=1)) if len(pts) > 1 else 0.0)
        up.plot(xs, ms, marker="o", ms=3, color=color, label=label)
        up.fill_between(xs, np.subtract(ms, sd), np.add(ms, sd), color=color, alpha=0.2, lw=0)
        f = flops[v["variant"]]
        comp.errorbar([np.mean(f) / 1e9], [v["test_mean"]], xerr=[np.std(f) / 1e9], yerr=[v["test_std"]], fmt="*",
                      ms=11, color=color, capsize=3, label=label)
    up.set(xscale="log", xlabel="cumulative uplink (MB)", ylabel="test accuracy (mean per device)",
           title="accuracy against uplink (band: ±1 std)")
    comp.set(xlabel="training GFLOPs per run (counted; all devices)", ylabel="final test accuracy",
             title="accuracy against training compute")
    for ax in (up, comp):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit("usage: python -m ops.bench.strategy_figures OUT.png RESULTS.json [RESULTS.json ...]")
    plot(Path(args[0]), load([Path(a) for a in args[1:]]))


if __name__ == "__main__":
    main()
