"""Files for a multi-seed variants comparison: results.csv/md/json and the accuracy-vs-communication
plot with each variant's mean curve and a shaded +-1 std band. (matplotlib lives here, not in shared/.)"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.sim.spread import VariantSummary, comparisons

FILES = ("results.csv", "results.md", "results.json", "accuracy_vs_communication.png")


def write_spread_report(out: Path, task: str, data_summary: str, summaries: Sequence[VariantSummary],
                        setup: dict[str, Any]) -> str:
    """Write the four files into `out`; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(s) for s in summaries]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    test = [c.text for c in comparisons(summaries, "test")]
    val = [c.text for c in comparisons(summaries, "val")]
    md = _markdown(task, data_summary, summaries, test, setup)
    (out / "results.md").write_text(md)
    payload = {"task": task, "setup": setup, "variants": [s.to_json() for s in summaries],
               "statements": {"test": test, "validation": val},
               "rule": "A beats B only when mean_A - mean_B > max(std_A, std_B), sample std (ddof=1) over seeds"}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_spread(out / "accuracy_vs_communication.png", task, summaries)
    return md


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f}"


def _row(s: VariantSummary) -> dict[str, Any]:
    return {
        "variant": s.variant, "seeds": len(s.seeds),
        "test_mean": round(s.test_mean, 4), "test_std": round(s.test_std, 4),
        "validation_mean": round(s.val_mean, 4), "validation_std": round(s.val_std, 4),
        "uplink_bits_per_param": round(s.uplink_bits_per_param, 4),
        "downlink_bits_per_param": round(s.downlink_bits_per_param, 4),
        "uplink_MB": round(s.uplink_mb, 4), "downlink_MB": round(s.downlink_mb, 4), "total_MB": round(s.total_mb, 4),
        "config": s.origin,
    }


def _markdown(task: str, data_summary: str, summaries: Sequence[VariantSummary], statements: list[str],
              setup: dict[str, Any]) -> str:
    seeds = summaries[0].seeds if summaries else []
    lines = [f"# {task}: variants over seeds {', '.join(map(str, seeds))}", "", data_summary, "",
             "Setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()), "",
             "| variant | test (mean ± std) | validation (mean ± std) | uplink bits/param | downlink bits/param "
             "| uplink MB | downlink MB | config |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.variant} | {_pm(s.test_mean, s.test_std)} | {_pm(s.val_mean, s.val_std)} "
                     f"| {s.uplink_bits_per_param:.3f} | {s.downlink_bits_per_param:.3f} | {s.uplink_mb:.3f} "
                     f"| {s.downlink_mb:.3f} | {s.origin} |")
    lines += ["", "Downlink bits/param = 8 × downlink bytes / (params × downloads); a download is one merged "
              "mask or global model received (one per participant per round, plus final downloads). "
              "Params: the masked elements for the FedMask family, every weight for the dense baselines.", "",
              "## Comparisons on test accuracy (A beats B only when mean_A − mean_B > max(std_A, std_B))", ""]
    lines += [f"- {t}" for t in statements]
    return "\n".join(lines) + "\n"


def plot_spread(path: Path, task: str, summaries: Sequence[VariantSummary]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(summaries):
        color = f"C{i}"
        label = f"{s.variant} (n={len(s.seeds)})"
        if s.curve:
            mb = [max(p["mb"], 1e-3) for p in s.curve]
            mean = [p["accuracy_mean"] for p in s.curve]
            std = [p["accuracy_std"] if math.isfinite(p["accuracy_std"]) else 0.0 for p in s.curve]
            ax.plot(mb, mean, marker="o", ms=3, color=color, label=label)
            ax.fill_between(mb, [m - d for m, d in zip(mean, std, strict=True)],
                            [m + d for m, d in zip(mean, std, strict=True)], color=color, alpha=0.2, lw=0)
        elif s.total_mb == 0:
            label += " (no communication; drawn at 1 kB)"
        # the final result (after any local adaptation or final broadcast), with its seed spread;
        # a log axis has no 0, so methods that send nothing are drawn at 1 kB and say so
        err = s.test_std if math.isfinite(s.test_std) else 0.0
        ax.errorbar([max(s.total_mb, 1e-3)], [s.test_mean], yerr=[err], fmt="*", ms=11, color=color,
                    capsize=3, label=None if s.curve else label, zorder=3)
    finish_accuracy_plot(fig, ax, path, f"{task}: mean over seeds, band ±1 std (stars: final)")


def finish_accuracy_plot(fig: Any, ax: Any, path: Path, title: str) -> None:
    """The axes every accuracy-vs-communication plot shares (log MB, legend), saved and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel("cumulative communication, uplink + downlink (MB, log scale)")
    ax.set_ylabel("mean personalized test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
