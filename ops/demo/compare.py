"""`fedmask demo --compare-modes`: which rhythm serves the demo fleet, through the real pipeline (issue 13).

The same fleet (10 workers, 3 emulating a Pi 4 by default) runs three times for the same wall-clock
budget, each a full demo with its own vhost reset, Redis database reset and state dir:
  sync-all   rounds, quorum 1.0 (every round waits for the slowest board);
  quorum     rounds, the demo's quorum (0.7) with late updates carried;
  async      --mode async, K=3 with 1/sqrt(1+tau) weights.
From the workers' own per-update records (ops/demo/curves.py) it computes the mean validation accuracy
over time, the time each mode takes to reach 95% of sync-all's mean at the budget (counted once every
board has reported), and the slow boards' accuracy at the budget. One run is one seed and one draw of
the machine's load: it measures no spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ops.demo.curves import at, fleet_curve, mean_curve, time_to
from ops.demo.run import DemoSettings, run_demo

TARGET_SHARE = 0.95
MODES = ("sync-all", "quorum", "async")


def mode_settings(s: DemoSettings, mode: str, budget_s: float) -> DemoSettings:
    base = dataclasses.replace(s, budget_s=budget_s, out=s.out / mode, strategy=None)
    if mode == "sync-all":
        return dataclasses.replace(base, mode="rounds", quorum=1.0, rounds=100_000)
    if mode == "quorum":
        return dataclasses.replace(base, mode="rounds", rounds=100_000)
    return dataclasses.replace(base, mode="async", buffer=3, staleness="sqrt")


def compare_modes(s: DemoSettings, budget_s: float, say: Any = print) -> dict[str, Any]:
    from ops.cli.common import write_json
    from ops.demo.report import plot

    for mode in MODES:
        ms = mode_settings(s, mode, budget_s)
        say(f"== {mode}: {budget_s:.0f}s of training, out {ms.out}")
        load_before = os.getloadavg()[0]
        report = run_demo(ms, say)
        report["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
        write_json(ms.out / "report.json", report)
        plot(report, ms.out / "pipeline.png")
    return summarize(read_runs(s.out, budget_s), budget_s, s)


def read_runs(out: Path, budget_s: float) -> dict[str, dict[str, Any]]:
    """Each mode's report and curve from its out dir: the comparison is a function of what the runs left."""
    runs = {}
    for mode in MODES:
        report = json.loads((out / mode / "report.json").read_text())
        profiles = {d: r["profile"] for d, r in report["devices"].items()}
        runs[mode] = {"report": report, "profiles": profiles,
                      "curve": fleet_curve(out / mode / "state", profiles, horizon_s=budget_s)}
    return runs


def summarize(runs: dict[str, dict[str, Any]], budget_s: float, s: DemoSettings) -> dict[str, Any]:
    sync_final = runs["sync-all"]["curve"]["curve"][-1]["mean_val_accuracy"]
    target = TARGET_SHARE * sync_final if sync_final is not None else None
    out: dict[str, Any] = {"budget_s": budget_s, "workers": s.workers, "pi4": s.pi4, "seed": s.seed,
                           "sync_all_final_mean_val": sync_final, "target": target,
                           "load_average": list(os.getloadavg()), "modes": {}}
    sync_t = None
    for mode, run in runs.items():
        c, profiles, report = run["curve"], run["profiles"], run["report"]
        n = len(profiles)
        t_target = time_to(c["curve"], target, n) if target is not None else None
        # 95% can be reached by the first local training alone (activity: ~0.82 of ~0.85); sync-all's own
        # mean at the budget is the stricter mark, reported next to it.
        t_full = time_to(c["curve"], sync_final, n) if sync_final is not None else None
        if mode == "sync-all":
            sync_t = t_target
        slow = [d for d, p in profiles.items() if p == "pi4"]
        slow_val = [v for v in (at(c["points"].get(d, []), budget_s) for d in slow) if v is not None]
        updates: dict[str, int] = {}
        for d, p in profiles.items():
            updates[p] = updates.get(p, 0) + sum(1 for t, _ in c["points"].get(d, []) if t <= budget_s)
        final = c["curve"][-1] if c["curve"] else {"mean_val_accuracy": None, "boards": 0}
        out["modes"][mode] = {
            "time_to_target_s": t_target, "time_to_sync_all_final_s": t_full,
            "final_mean_val": final["mean_val_accuracy"], "boards_reported_at_budget": final["boards"],
            "slow_final_val": sum(slow_val) / len(slow_val) if slow_val else None,
            "slow_boards_reported": len(slow_val),
            "slow_test_acc_merged": _mean([report["devices"][d]["accuracy_merged"] for d in slow]),
            "mean_test_acc_merged": report["mean_accuracy_merged"],
            "mean_test_acc_final": report["mean_accuracy_final"],
            "updates_within_budget": updates,
            "merges": len(report["rounds"]) if "rounds" in report else len(report["flushes"]),
            "wall_seconds": report["wall_seconds"], "load_average_1m": report.get("load_average_1m"),
            "curve": [r for r in c["curve"] if r["t"] % 10 == 0 or r is c["curve"][-1]],
            "slow_curve": mean_curve({d: c["points"].get(d, []) for d in slow},
                                     [float(t) for t in range(0, int(budget_s) + 1, 10)]),
        }
    for m in out["modes"].values():
        t = m["time_to_target_s"]
        m["speedup_vs_sync_all"] = (sync_t / t) if sync_t is not None and t else None
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def render(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"{r['workers']} workers ({r['pi4']} pi4), {r['budget_s']:.0f}s each, seed {r['seed']}; target = "
             f"{TARGET_SHARE:.0%} of sync-all's mean val accuracy at the budget ({f(r['sync_all_final_mean_val'])})"
             f" = {f(r['target'])}",
             f"{'mode':<10}{'merges':>7}{'to target s':>12}{'speedup':>8}{'to 100% s':>10}{'val@budget':>11}"
             f"{'slow val':>9}{'slow test':>10}{'test merged':>12}{'updates pi4/jetson':>20}"]
    for mode, m in r["modes"].items():
        u = m["updates_within_budget"]
        lines.append(f"{mode:<10}{m['merges']:>7}{f(m['time_to_target_s'], '.0f'):>12}"
                     f"{f(m['speedup_vs_sync_all'], '.2f'):>8}{f(m['time_to_sync_all_final_s'], '.0f'):>10}"
                     f"{f(m['final_mean_val']):>11}{f(m['slow_final_val']):>9}"
                     f"{f(m['slow_test_acc_merged']):>10}{f(m['mean_test_acc_merged']):>12}"
                     f"{u.get('pi4', 0):>10}/{u.get('jetson', 0)}")
    return "\n".join(lines)


def plot_compare(r: dict[str, Any], path: Path) -> None:
    """Mean validation accuracy over time per mode (solid: every board that reported; dotted: the slow boards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (mode, m), color in zip(r["modes"].items(), ("tab:gray", "tab:orange", "tab:green"), strict=False):
        for key, style, label in (("curve", "-", mode), ("slow_curve", ":", f"{mode}, pi4 boards")):
            pts = [(row["t"], row["mean_val_accuracy"]) for row in m[key] if row["mean_val_accuracy"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
    if r["target"] is not None:
        ax.axhline(r["target"], color="k", linestyle="--", linewidth=0.8, label="95% of sync-all at the budget")
    ax.set(xlabel="seconds since the first task", ylabel="mean of each board's latest val accuracy",
           title=f"{r['workers']} workers ({r['pi4']} pi4) through the pipeline, {r['budget_s']:.0f}s per mode")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out(out: Path) -> Path:
    return out if out != Path("runs/demo") else Path("runs/compare-modes")
