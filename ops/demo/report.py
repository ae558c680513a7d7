"""What `make demo` shows: the per-device table and the two-panel plot of a demo report (ops/demo/run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ops.demo.metrics_scrape import render as render_metrics


def render_table(report: dict[str, Any]) -> str:
    if report.get("mode") == "async":
        from ops.demo.async_report import render_async_table

        return render_async_table(report)
    strategy = report["settings"].get("strategy")
    if strategy:
        return render_strategy_table(report, strategy)
    lines = [f"{'device':<14}{'profile':<8}{'mask v':>7}{'acc merged':>11}{'acc final':>10}{'updates':>8}"
             f"{'KB up':>9}{'KB down':>9}{'task s':>8}"]
    for d, r in report["devices"].items():
        train = "" if r["median_turnaround_s"] is None else f"{r['median_turnaround_s']:.2f}"
        lines.append(f"{d:<14}{r['profile']:<8}{r['mask_version']:>7}{r['accuracy_merged']:>11.3f}"
                     f"{r['accuracy_final']:>10.3f}{r['updates']:>8}{r['bytes_up'] / 1e3:>9.1f}"
                     f"{r['bytes_down'] / 1e3:>9.1f}{train:>8}")
    lines.append(f"mean personalized accuracy: {report['mean_accuracy_merged']:.3f} with the merged mask, "
                 f"{report['mean_accuracy_final']:.3f} after final local adaptation")
    prof = ", ".join(f"{k} {v:.1f}s" for k, v in report["turnaround_seconds_by_profile"].items())
    lines.append(f"median board turnaround (task received -> update sent): {prof}")
    lines.append(f"median round time {report['median_round_seconds']:.1f}s over {len(report['rounds'])} rounds; "
                 f"late updates {report['late']['updates']} (carried {report['late']['carried']}, dropped "
                 f"{report['late']['dropped']}, expired {report['late']['expired']})")
    unmerged = [d for d, r in report["devices"].items() if r["mask_version"] == 0]
    if unmerged:
        lines.append(f"no merged mask yet (their update was still in flight when the run ended): {', '.join(unmerged)}")
    if report["close_latency_ms"]:
        lines.append(f"round close latency p50 {report['close_latency_ms']['p50']:.0f} ms, "
                     f"max {report['close_latency_ms']['max']:.0f} ms")
    learning = [r for r in report.get("learning", []) if r["mean_val_accuracy"] is not None]
    if learning:
        lines.append("mean validation accuracy per round (devices' own reports): " +
                     " ".join(f"{r['round']}:{r['mean_val_accuracy']:.3f}" for r in learning))
    if "metrics" in report:
        lines.append(render_metrics(report["metrics"]))
    return "\n".join(lines)


def render_strategy_table(report: dict[str, Any], strategy: str) -> str:
    """A strategy's run: no masks, one accuracy (its own evaluation), and what late updates cost it."""
    lines = [f"{'device':<14}{'profile':<8}{'accuracy':>9}{'updates':>8}{'KB up':>9}{'KB down':>9}{'task s':>8}"]
    for d, r in report["devices"].items():
        train = "" if r["median_turnaround_s"] is None else f"{r['median_turnaround_s']:.2f}"
        lines.append(f"{d:<14}{r['profile']:<8}{r['accuracy_merged']:>9.3f}{r['updates']:>8}"
                     f"{r['bytes_up'] / 1e3:>9.1f}{r['bytes_down'] / 1e3:>9.1f}{train:>8}")
    lines.append(f"strategy {strategy}: mean personalized accuracy {report['mean_accuracy_merged']:.3f}")
    prof = ", ".join(f"{k} {v:.1f}s" for k, v in report["turnaround_seconds_by_profile"].items())
    lines.append(f"median board turnaround (task received -> update sent): {prof}")
    lines.append(f"median round time {report['median_round_seconds']:.1f}s over {len(report['rounds'])} rounds; "
                 f"late updates {report['late']['updates']} (dropped {report['late']['dropped']})")
    if "metrics" in report:
        lines.append(render_metrics(report["metrics"]))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.get("mode") == "async":
        from ops.demo.async_report import plot_async

        plot_async(report, path)
        return
    devices = report["devices"]
    colors = {"pi4": "tab:red", "jetson": "tab:blue"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.5))
    from matplotlib.patches import Patch

    for r in report["rounds"]:
        ax1.bar(r["round"], r["seconds"], color="0.85", width=0.8)
        for d, secs in r["arrivals"].items():
            carried = d in r["carried_devices"]
            ax1.scatter(r["round"], secs, s=30 if carried else 14, marker="x" if carried else "o", zorder=3,
                        color=colors.get(devices.get(d, {}).get("profile", ""), "k"))
    handles = [Patch(color="0.85", label="round open -> closed")]
    handles += [ax1.scatter([], [], color=c, s=14, label=f"{name} update arrives") for name, c in colors.items()]
    handles.append(ax1.scatter([], [], color="k", marker="x", s=30, label="late update carried in"))
    ax1.set(xlabel="round", ylabel="seconds since the round opened",
            title=f"quorum {report['settings']['quorum']}: rounds close without the slow boards")
    ax1.legend(handles=handles, fontsize=8)
    names = list(devices)
    x = np.arange(len(names))
    strategy = report["settings"].get("strategy")
    if strategy:  # one figure per device: the strategy's own evaluation
        ax2.bar(x, [devices[d]["accuracy_merged"] for d in names], 0.6, label=f"strategy {strategy}",
                color=[colors[devices[d]["profile"]] for d in names])
    else:
        ax2.bar(x - 0.2, [devices[d]["accuracy_merged"] for d in names], 0.4, label="merged mask",
                color=[colors[devices[d]["profile"]] for d in names], alpha=0.5)
        ax2.bar(x + 0.2, [devices[d]["accuracy_final"] for d in names], 0.4, label="after final adaptation",
                color=[colors[devices[d]["profile"]] for d in names])
    ax2.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax2.set(ylabel="test accuracy (own data)", ylim=(0, 1), title="personalized accuracy per device")
    ax2.legend(fontsize=8)
    plot_learning(ax3, report.get("learning", []))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Mean validation (and training) accuracy per round, as the devices reported them in their updates."""
    for key, label, style in (("mean_val_accuracy", "validation (own split)", "o-"),
                              ("mean_train_accuracy", "training", "s--")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label, markersize=4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="mean accuracy over the round's devices", ylim=(0, 1),
           title="learning: what the devices report each round")
    if rows:
        ax.legend(fontsize=8)
