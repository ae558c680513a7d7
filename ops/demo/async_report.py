"""What `fedmask demo --mode async` shows: the per-device table and the plot (ops/demo/async_run.py).
The rounds demo's parts that apply are kept (accuracy, bytes, turnaround, metrics); the rounds table
becomes the flushes, and learning is over wall-clock time (the boards' own records) instead of per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ops.demo.metrics_scrape import render as render_metrics

COLORS = {"pi4": "tab:red", "jetson": "tab:blue"}


def render_async_table(report: dict[str, Any]) -> str:
    lines = [f"{'device':<14}{'profile':<8}{'mask v':>7}{'acc merged':>11}{'acc final':>10}{'updates':>8}"
             f"{'flushes':>8}{'KB up':>9}{'KB down':>9}{'task s':>8}"]
    for d, r in report["devices"].items():
        train = "" if r["median_turnaround_s"] is None else f"{r['median_turnaround_s']:.2f}"
        lines.append(f"{d:<14}{r['profile']:<8}{r['mask_version']:>7}{r['accuracy_merged']:>11.3f}"
                     f"{r['accuracy_final']:>10.3f}{r['updates']:>8}{r['flushes']:>8}{r['bytes_up'] / 1e3:>9.1f}"
                     f"{r['bytes_down'] / 1e3:>9.1f}{train:>8}")
    lines.append(f"mean personalized accuracy: {report['mean_accuracy_merged']:.3f} with the merged mask, "
                 f"{report['mean_accuracy_final']:.3f} after final local adaptation")
    prof = ", ".join(f"{k} {v:.1f}s" for k, v in report["turnaround_seconds_by_profile"].items())
    lines.append(f"median board turnaround (task received -> update sent): {prof}")
    st = report["stream"]
    lines.append(f"async stream (K={st['buffer_k']}, max staleness {st['max_staleness']}, {st['staleness']}): "
                 f"{st['flushes']} flushes in {report['wall_seconds']:.0f}s; updates stored {st['stored']}, merged "
                 f"{st['merged']}, replaced {st['replaced']}, still buffered {st['buffered']}, duplicate "
                 f"{st['duplicate']}")
    unmerged = [d for d, r in report["devices"].items() if r["mask_version"] == 0]
    if unmerged:
        lines.append(f"no merged mask yet (their update was still buffered when the run ended): {', '.join(unmerged)}")
    curve = [r for r in report.get("learning_over_time", []) if r["mean_val_accuracy"] is not None]
    if curve:
        every = max(1, len(curve) // 12)
        lines.append("mean validation accuracy over time (devices' own reports, s:acc): " +
                     " ".join(f"{r['t']:.0f}:{r['mean_val_accuracy']:.3f}" for r in curve[::every]))
    if "metrics" in report:
        lines.append(render_metrics(report["metrics"]))
    return "\n".join(lines)


def plot_async(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = report["devices"]
    names = list(devices)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.5))
    for i, d in enumerate(names):
        tl = report["timeline"].get(d, {"updates": [], "masks": []})
        c = COLORS.get(devices[d]["profile"], "k")
        ax1.scatter(tl["updates"], [i] * len(tl["updates"]), s=14, color=c, marker="o")
        ax1.scatter(tl["masks"], [i + 0.25] * len(tl["masks"]), s=24, color=c, marker="x")
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    handles = [ax1.scatter([], [], color=c, s=14, label=f"{n} update sent") for n, c in COLORS.items()]
    handles.append(ax1.scatter([], [], color="k", marker="x", s=24, label="merged mask applied"))
    st = report["stream"]
    ax1.set(xlabel="seconds since the first task", title=f"async K={st['buffer_k']} ({st['staleness']}): "
            f"{st['flushes']} flushes, no round waits for a slow board")
    ax1.legend(handles=handles, fontsize=8)
    x = np.arange(len(names))
    colors = [COLORS[devices[d]["profile"]] for d in names]
    ax2.bar(x - 0.2, [devices[d]["accuracy_merged"] for d in names], 0.4, label="merged mask", color=colors, alpha=0.5)
    ax2.bar(x + 0.2, [devices[d]["accuracy_final"] for d in names], 0.4, label="after final adaptation", color=colors)
    ax2.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax2.set(ylabel="test accuracy (own data)", ylim=(0, 1), title="personalized accuracy per device")
    ax2.legend(fontsize=8)
    pts = [(r["t"], r["mean_val_accuracy"]) for r in report.get("learning_over_time", [])
           if r["mean_val_accuracy"] is not None]
    if pts:
        ax3.plot(*zip(*pts, strict=True), "-", label="validation (own split)")
        ax3.legend(fontsize=8)
    ax3.set(xlabel="seconds since the first task", ylabel="mean of each board's latest report", ylim=(0, 1),
            title="learning: what the devices report over time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
