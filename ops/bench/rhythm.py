"""`fedmask bench rhythm`: which rhythm serves a mixed fleet (issue 13), in the clock simulator.

For each fleet (size, share of slow boards, their slowdown) and seed: sync-all runs `rounds` rounds;
its final mean personalized accuracy sets the target (95% of it) and the time it first reaches the
target. Then quorum-with-carry and the async modes run on the same boards, the same task durations
(common random numbers) and the same learner, up to a horizon of `horizon_factor` x sync-all's time to
target (capped at sync-all's end): a mode that reaches the target by half of sync-all's time is >= 2x
sooner. Reported per mode: the accuracy curve (all boards, fast, slow), time to target and speedup,
accuracy at the horizon by profile against sync-all's at the same clock time and at its end, updates
sent / merged and merged masks received per board by profile, bytes per board.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.sim.rhythm import RhythmConfig, RhythmResult, run_rhythm, summary
from shared.sim.rhythm_fleet import FleetTiming, Learner
from shared.sim.vector_learner import VectorConfig, VectorFedMask

Say = Callable[[str], None]


@dataclass(frozen=True)
class RhythmBench:
    sizes: tuple[int, ...] = (10, 100, 1000, 10000)
    slow_shares: tuple[float, ...] = (0.3, 0.7)
    slowdowns: tuple[float, ...] = (5.0, 20.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 100  # sync-all rounds (its "100 merges")
    horizon_factor: float = 2.0
    rule: str = "paper"
    quorum: float = 0.7  # the demo's (today's default for a mixed fleet)
    max_staleness: int = 10  # quorum: rounds (the demo's bound)
    k_fraction: float = 0.1  # async buffer K = max(1, round(k_fraction x boards))
    async_staleness: int = 20  # async: merges
    modes: tuple[str, ...] = ("sync", "quorum", "async", "async-sqrt")
    target: float = 0.95
    learner: str = "vector"  # vector | torch (torch: digits through DeviceRuntime, small fleets only)
    # torch only: a pipeline variant's model, device config and rule (shared/variant_setup.py), e.g.
    # fedmask-agree (the agreement rule: theta down as q4); "" = the digits preset under `rule`.
    variant: str = ""

    def __post_init__(self) -> None:
        if self.variant and self.learner != "torch":
            raise ValueError(f"--variant {self.variant} runs on the torch learner only (--learner torch): the vector "
                             "learner's boards upload thresholded masks and adopt bits")

    @property
    def merge_rule(self) -> str:
        if not self.variant:
            return self.rule
        from shared.variant_setup import variant_setup

        return variant_setup("digits", self.variant).merge


def _learner(b: RhythmBench, n: int, seed: int) -> Learner:
    if b.learner == "vector":
        return VectorFedMask(n, VectorConfig(seed=seed))
    from shared.data import load_task
    from shared.device import FedMaskConfig
    from shared.presets import model_spec, preset
    from shared.sim.torch_learner import TorchFedMask
    from shared.variant_setup import variant_setup

    data = load_task("digits", num_devices=n, seed=seed)
    if b.variant:
        setup = variant_setup("digits", b.variant, seed=seed)
        return TorchFedMask(data, setup.spec, setup.fedmask, seed)
    p = preset("digits")
    return TorchFedMask(data, model_spec("digits", seed=seed), FedMaskConfig(train=p.mask_train,
                                                                              local_epochs=p.local_epochs), seed)


def _eval_grid(end: float) -> tuple[float, ...]:
    """Log-spaced from 1 s (10% steps) plus 60 even steps to `end`: time to target within ~2-10%."""
    grid = set(np.geomspace(1.0, max(end, 2.0), 100).tolist()) | set(np.linspace(0.0, end, 61).tolist())
    return tuple(sorted(t for t in grid if t <= end))


def first_time(curve: list[dict[str, float]], key: str, level: float) -> float:
    return next((p["t"] for p in curve if p[key] >= level), math.inf)


def value_at(curve: list[dict[str, float]], key: str, t: float) -> float:
    """The curve's value at clock time t (the last point at or before t)."""
    before = [p for p in curve if p["t"] <= t + 1e-9]
    return before[-1][key] if before else math.nan


def _mode_cfg(mode: str, b: RhythmBench, n: int, seed: int, **kw: Any) -> RhythmConfig:
    rule = b.merge_rule
    if mode == "sync":
        return RhythmConfig(mode="sync", rule=rule, seed=seed, **kw)
    if mode == "quorum":
        return RhythmConfig(mode="quorum", rule=rule, quorum=b.quorum, max_staleness=b.max_staleness,
                            seed=seed, **kw)
    return RhythmConfig(mode="async", rule=rule, k=max(1, round(b.k_fraction * n)), max_staleness=b.async_staleness,
                        staleness="sqrt" if mode == "async-sqrt" else "constant", seed=seed, **kw)


def _row(mode: str, res: RhythmResult, timing: FleetTiming, n: int) -> dict[str, Any]:
    per = summary(res, timing)
    return {"mode": mode, "wall_seconds": res.wall_seconds, "cpu_seconds": res.cpu_seconds,
            "sim_seconds": res.sim_seconds, "merges": res.merges,
            "trained": res.trained, "curve": res.curve, "by_profile": per, "counters": res.counters,
            "bytes_up_per_board": res.bytes_up / n, "bytes_down_per_board": res.bytes_down / n}


def run_fleet(b: RhythmBench, n: int, share: float, slowdown: float, seed: int, say: Say) -> dict[str, Any]:
    learner = _learner(b, n, seed)
    timing = FleetTiming.mixed(learner.device_ids(), share, slowdown, seed=seed)
    sync = run_rhythm(learner, timing, _mode_cfg("sync", b, n, seed, merges=b.rounds, eval_after_merge=True))
    final = sync.curve[-1]["accuracy"]
    target = b.target * final
    t_sync = first_time(sync.curve, "accuracy", target)
    horizon = min(sync.sim_seconds, b.horizon_factor * t_sync)
    rows = {"sync": _row("sync", sync, timing, n)}
    say(f"  n={n} slow={share:g} x{slowdown:g} seed {seed}: sync-all {sync.merges} rounds in {sync.sim_seconds:.0f} "
        f"sim-s ({sync.wall_seconds:.1f} s wall), final {final:.3f}, target {target:.3f} at {t_sync:.0f} s")
    for mode in b.modes:
        if mode == "sync":
            continue
        learner = _learner(b, n, seed)
        cfg = _mode_cfg(mode, b, n, seed, merges=10**9, horizon_s=horizon, eval_times=_eval_grid(horizon))
        res = run_rhythm(learner, timing, cfg)
        rows[mode] = _row(mode, res, timing, n)
        say(f"    {mode}: {res.merges} merges to {res.sim_seconds:.0f} sim-s ({res.wall_seconds:.1f} s wall), "
            f"target at {first_time(res.curve, 'accuracy', target):.0f} s")
    for r in rows.values():
        t = first_time(r["curve"], "accuracy", target)
        r["time_to_target"] = t
        r["speedup"] = 0.0 if math.isinf(t) else (t_sync / t if t > 0 else math.inf)  # 0: never reached
        for key in ("accuracy", "accuracy_fast", "accuracy_slow"):
            r[f"{key}_at_horizon"] = value_at(r["curve"], key, horizon)
            r[f"sync_{key}_at_horizon"] = value_at(sync.curve, key, horizon)
    return {"devices": n, "slow_share": share, "slowdown": slowdown, "seed": seed, "sync_final_accuracy": final,
            "sync_final_accuracy_slow": sync.curve[-1]["accuracy_slow"], "target": target, "horizon": horizon,
            "sync_time_to_target": t_sync, "modes": rows}


def run_rhythm_bench(b: RhythmBench, say: Say = print, on_fleet: Callable[[dict[str, Any]], None] | None = None,
                     ) -> dict[str, Any]:
    started = time.perf_counter()
    runs = []
    for n in b.sizes:
        for share in b.slow_shares:
            for slowdown in b.slowdowns:
                for seed in b.seeds:
                    runs.append(run_fleet(b, n, share, slowdown, seed, say))
                    if on_fleet is not None:
                        on_fleet(runs[-1])
    return {"settings": asdict(b), "runs": runs, "table": table(runs, b.modes),
            "wall_seconds": time.perf_counter() - started}


def _spread(xs: list[float]) -> dict[str, float]:
    """Mean, min, max over seeds (a speedup of 0 or a time of inf: the mode never reached the target)."""
    return {"mean": float(np.mean(xs)), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}


def table(runs: list[dict[str, Any]], modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per (fleet, mode): figures over seeds (mean, min, max)."""
    groups: dict[tuple[int, float, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["devices"], r["slow_share"], r["slowdown"]), []).append(r)
    rows = []
    for (n, share, slowdown), rs in sorted(groups.items()):
        for mode in modes:
            ms = [r["modes"][mode] for r in rs]
            rows.append({
                "devices": n, "slow_share": share, "slowdown": slowdown, "mode": mode, "seeds": len(rs),
                "speedup": _spread([m["speedup"] for m in ms]),
                "time_to_target": {**_spread([m["time_to_target"] for m in ms]),
                                   "unreached": sum(1 for m in ms if math.isinf(m["time_to_target"]))},
                "accuracy_at_horizon": _spread([m["accuracy_at_horizon"] for m in ms]),
                "slow_at_horizon": _spread([m["accuracy_slow_at_horizon"] for m in ms]),
                "sync_slow_at_horizon": _spread([m["sync_accuracy_slow_at_horizon"] for m in ms]),
                "sync_slow_final": _spread([r["sync_final_accuracy_slow"] for r in rs]),
                "slow_updates_merged": _spread([m["by_profile"]["slow"]["updates_merged"] for m in ms]),
                "slow_masks": _spread([m["by_profile"]["slow"]["masks_received"] for m in ms]),
                "fast_masks": _spread([m["by_profile"]["fast"]["masks_received"] for m in ms]),
                "slow_without_mask": _spread([m["by_profile"]["slow"]["boards_without_mask"] for m in ms]),
                "bytes_up_per_board": _spread([m["bytes_up_per_board"] for m in ms]),
                "bytes_down_per_board": _spread([m["bytes_down_per_board"] for m in ms]),
                "wall_seconds": _spread([m["wall_seconds"] for m in ms]),
            })
    return rows


def _num(x: float | None, spec: str) -> str:
    """A figure, or n/a where there is none: e.g. sync-all's accuracy at a horizon before its first round
    closed (a horizon factor < 1 when one round reaches the target), which the JSON output holds as null."""
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| boards | slow | x | mode | speedup to target (min-max) | acc at horizon | slow acc (sync same time / "
            "sync end) | slow merged / masks per board | slow boards w/o mask | kB up / down per board |")
    lines = [head, "| " + " | ".join(["---"] * 10) + " |"]
    for r in rows:
        s = r["speedup"]
        miss = r["time_to_target"]["unreached"]
        sp = f"{s['mean']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" + (f", {miss:g} unreached" if miss else "")
        lines.append(
            f"| {r['devices']} | {r['slow_share']:.0%} | {r['slowdown']:g} | {r['mode']} | {sp} | "
            f"{_num(r['accuracy_at_horizon']['mean'], '.3f')} | {_num(r['slow_at_horizon']['mean'], '.3f')} "
            f"({_num(r['sync_slow_at_horizon']['mean'], '.3f')} / {_num(r['sync_slow_final']['mean'], '.3f')}) | "
            f"{r['slow_updates_merged']['mean']:.1f} / {r['slow_masks']['mean']:.1f} | "
            f"{r['slow_without_mask']['mean']:.1f} | {r['bytes_up_per_board']['mean'] / 1e3:.1f} / "
            f"{r['bytes_down_per_board']['mean'] / 1e3:.1f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean personalized accuracy against simulated wall-clock, one panel per fleet (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["seed"] == result["runs"][0]["seed"]]
    cols = 4
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = {"sync": "black", "quorum": "tab:blue", "async": "tab:red", "async-sqrt": "tab:orange"}
    for ax, r in zip(axes.flat, runs, strict=False):
        for mode, m in r["modes"].items():
            ts = [max(p["t"], 1.0) for p in m["curve"]]
            ax.plot(ts, [p["accuracy"] for p in m["curve"]], color=colors.get(mode, "k"), label=mode, lw=1.3)
            ax.plot(ts, [p["accuracy_slow"] for p in m["curve"]], color=colors.get(mode, "k"), ls=":", lw=1)
        ax.axhline(r["target"], color="0.6", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{r['devices']} boards, {r['slow_share']:.0%} slow x{r['slowdown']:g}", fontsize=9)
        ax.set_xlabel("simulated seconds", fontsize=8)
        ax.set_ylabel("mean personalized acc.", fontsize=8)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="solid: all, dotted: slow", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale_check(n: int, mode: str, merges: int = 100, *, share: float = 0.3, slowdown: float = 20.0,
                k_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """One mode at fleet size `n` for `merges` merges (no horizon), 40 evaluations: the simulator's own
    wall and CPU time (issue 13: 10,000 boards x 100 merges in under 10 minutes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    learner = VectorFedMask(n, VectorConfig(seed=seed))
    timing = FleetTiming.mixed(learner.device_ids(), share, slowdown, seed=seed)
    setup_wall, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
    cfg = RhythmConfig(mode="sync" if mode == "sync" else mode.split("-")[0], merges=merges,
                       k=max(1, round(k_fraction * n)), max_staleness=20 if mode.startswith("async") else 10,
                       staleness="sqrt" if mode == "async-sqrt" else "constant", seed=seed,
                       eval_times=tuple(np.geomspace(1.0, 1e5, 40).tolist()))
    res = run_rhythm(learner, timing, cfg)
    return {"devices": n, "mode": mode, "merges": res.merges, "trained": res.trained, "sim_seconds": res.sim_seconds,
            "setup_wall_seconds": setup_wall, "setup_cpu_seconds": setup_cpu, "wall_seconds": res.wall_seconds,
            "cpu_seconds": res.cpu_seconds, "final_accuracy": res.curve[-1]["accuracy"]}
