"""`fedmask experiment`: every method on one task in the simulator; results.csv, results.md,
results.json and the accuracy-vs-communication plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ops.engine.report import finish_accuracy_plot
from shared.data import FederatedDataset
from shared.device import FedMaskConfig
from shared.models import ModelSpec
from shared.presets import TaskPreset
from shared.sim.result import SimResult
from shared.sim.runner import run_method
from shared.train import TrainConfig


class ProgressBar(Protocol):
    def __call__(self, done: int, total: int, info: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def planned_runs(methods: str, merges: str) -> list[tuple[str, str | None]]:
    """One run per method in the comma list; FedMask once per merge rule."""
    runs: list[tuple[str, str | None]] = []
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        runs += [(m, rule.strip()) for rule in merges.split(",")] if m == "fedmask" else [(m, None)]
    return runs


def run_label(method: str, merge: str | None) -> str:
    return f"{method}[{merge}]" if merge else method


def run_experiment(data: FederatedDataset, spec: ModelSpec, p: TaskPreset, runs: list[tuple[str, str | None]], *,
                   rounds: int, eval_every: int, final_local_epochs: int, mask_train: TrainConfig, seed: int,
                   save_devices: Path | None, progress: Callable[[str], ProgressBar],
                   say: Callable[[str], None]) -> list[SimResult]:
    """Run every (method, merge rule) in order; only the first FedMask run saves its device states."""
    results: list[SimResult] = []
    saved = False
    for method, rule in runs:
        label = run_label(method, rule)
        bar = progress(label)
        try:
            r = run_method(method, data, spec, p, rounds=rounds, sample_rate=p.sample_rate,
                           local_epochs=p.local_epochs, seed=seed, merge=rule or p.merge,
                           final_local_epochs=final_local_epochs, eval_every=eval_every, progress=bar,
                           save_devices=save_devices if method == "fedmask" and not saved else None,
                           fedmask_cfg=FedMaskConfig(train=mask_train, local_epochs=p.local_epochs))
        finally:
            bar.close()
        say(f"{label:22s} accuracy {r.personalized_accuracy:.4f}  "
            f"comm {(r.uplink_bytes + r.downlink_bytes) / 1e6:10.3f} MB")
        results.append(r)
        saved = saved or method == "fedmask"
    return results


def write_results(out: Path, task: str, results: list[SimResult], summary: str) -> str:
    """Write results.csv, results.md, results.json and accuracy_vs_communication.png; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in results]
    _write_csv(out / "results.csv", rows)
    markdown = _markdown(task, rows, summary)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    _plot(out / "accuracy_vs_communication.png", task, results)
    return markdown


def _row(r: SimResult) -> dict[str, Any]:
    return {
        "method": run_label(r.method, r.merge),
        "personalized_accuracy": round(r.personalized_accuracy, 4),
        "validation_accuracy": round(r.validation_accuracy, 4),
        "uplink_MB": round(r.uplink_bytes / 1e6, 4),
        "downlink_MB": round(r.downlink_bytes / 1e6, 4),
        "uplink_bits_per_param": round(r.uplink_bits_per_param, 4),
        "train_seconds": round(r.train_seconds, 2),
        "params": r.params,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _markdown(task: str, rows: list[dict[str, Any]], summary: str) -> str:
    cols = list(rows[0])
    lines = [f"# {task}", "", summary, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(path: Path, task: str, results: list[SimResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        pts = [(h["uplink_mb"] + h["downlink_mb"], h["accuracy"]) for h in r.history if "accuracy" in h]
        label = run_label(r.method, r.merge)
        total_mb = (r.uplink_bytes + r.downlink_bytes) / 1e6
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=color, label=label)
        elif total_mb == 0:
            label += " (no communication; drawn at 1 kB)"
        # a log axis has no 0: methods that send nothing are drawn at 1 kB, and say so in the legend
        ax.scatter([max(total_mb, 1e-3)], [r.personalized_accuracy], marker="*", s=110, color=color,
                   label=None if pts else label, zorder=3)
    finish_accuracy_plot(fig, ax, path, f"{task}: accuracy vs communication (stars: final, after any local adaptation)")
