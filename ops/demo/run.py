"""The product's main job (`make demo`): a mixed Pi 4 / Jetson fleet trains FedMask through the
real pipeline, then each device's personalized model is scored on its own held-out data.

Steps: services up (local or Docker), a fresh vhost and Redis database, N enrolled worker
processes, R rounds closed on a quorum with late updates carried, every worker stopped, then a
table (accuracy, bytes, round time per profile, late updates) and a plot. It fails loudly if any
step did not happen: a round that did not close, a worker that died, a device with no merged mask.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.store import RoundInfo, RoundStore
from ops.control.rounds import RoundPlan
from ops.fleet.workers import Fleet, FleetSpec
from shared.errors import FedMaskError


@dataclass(frozen=True)
class DemoSettings:
    task: str = "activity"
    workers: int = 10
    pi4: int = 3
    rounds: int = 12
    quorum: float = 0.7
    deadline_s: float = 300.0
    late: str = "carry"
    # An emulated Pi 4 task spans about 8 rounds on this 2-core machine (5x slowdown on top of CPU
    # contention among 10 workers): a bound of 10 lets its update still count instead of being dropped.
    max_staleness: int = 10
    seed: int = 0
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/1"
    out: Path = Path("runs/demo")


def fleet_profiles(ids: list[str], workers: int, pi4: int) -> dict[str, str]:
    if not 0 <= pi4 <= workers <= len(ids):
        raise FedMaskError(f"need 0 <= pi4 ({pi4}) <= workers ({workers}) <= devices with data ({len(ids)})")
    return {d: ("pi4" if i < pi4 else "jetson") for i, d in enumerate(ids[:workers])}


def _worker_stats(state_dir: Path, device: str) -> dict[str, Any]:
    """Bytes both ways, and the board's turnaround per task: task received -> update sent."""
    up = down = 0
    board_s: list[float] = []
    tasked: dict[int, float] = {}
    path = state_dir / f"{device}.stats.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        up += rec.get("bytes_up", 0)
        down += rec.get("bytes_down", 0)
        if rec["type"] == "task":
            tasked[rec["round"]] = rec["t"]
        elif rec["type"] == "update":
            board_s.append(rec["t"] - tasked.get(rec["round"], rec["t"] - rec["board_s"]))
    return {"bytes_up": up, "bytes_down": down, "updates": len(board_s),
            "median_turnaround_s": statistics.median(board_s) if board_s else None}


def evaluate_devices(task: str, profiles: dict[str, str], state_dir: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Each device's model as the worker left it on disk, scored on that device's own test split;
    then after the same final local adaptation the simulator applies (so the figures compare)."""
    from shared.data import load_task
    from shared.device import DeviceRuntime, FedMaskConfig, derive_seed
    from shared.presets import model_spec, preset
    from shared.train import local_train

    p = preset(task)
    data = {d.device_id: d for d in load_task(task, num_devices=p.devices, seed=seed, **p.data_options).devices}
    cfg = FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    spec = model_spec(task, seed=seed)
    out = {}
    for d, profile in profiles.items():
        dev = DeviceRuntime(d, spec, cfg, (data[d].train.x, data[d].train.y), seed)
        dev.load(state_dir / f"{d}.npz")
        merged_acc = dev.evaluate(data[d].test.x, data[d].test.y)[1]
        local_train(dev.model, dev.x, dev.y, p.final_local_epochs, cfg.train, seed=derive_seed(seed, "final", d))
        out[d] = {"profile": profile, "mask_version": dev.mask_version, "accuracy_merged": merged_acc,
                  "accuracy_final": dev.evaluate(data[d].test.x, data[d].test.y)[1],
                  **_worker_stats(state_dir, d)}
    return out


def run_demo(s: DemoSettings, say: Any = print) -> dict[str, Any]:
    from shared.data import load_task
    from shared.presets import preset

    p = preset(s.task)
    say(f"loading {s.task} data (the first run builds a cache under .data/) ...")
    ids = [d.device_id for d in load_task(s.task, num_devices=p.devices, seed=s.seed, **p.data_options).devices]
    profiles = fleet_profiles(ids, s.workers, s.pi4)
    spec = FleetSpec(task=s.task, devices=profiles, amqp_url=s.amqp_url, redis_url=s.redis_url,
                     run_dir=s.out, seed=s.seed)
    plan = RoundPlan(rate=1.0, quorum=s.quorum, deadline_s=s.deadline_s, seed=s.seed, late=s.late,
                     max_staleness=s.max_staleness)
    started = time.time()
    with Fleet(spec, say=say) as fleet:
        run = fleet.run_rounds(s.rounds, plan, on_round=lambda i: _say_round(say, i))
        store = RoundStore.from_url(s.redis_url)
        _wait_outstanding(store, fleet, list(profiles), s.deadline_s, say)
        _wait_last_masks(store, fleet, profiles)
        counters = store.counters()
        # Re-read every round: late updates keep arriving (and are listed) after a round closed.
        final = [store.info(r.round_id) or r for r in run.rounds]
    devices = evaluate_devices(s.task, profiles, fleet.state_dir, s.seed)
    report = summarize(final, devices, counters, s, time.time() - started)
    silent = [d for d, r in devices.items() if r["updates"] == 0]
    if silent:  # a board that never answered a task means the pipeline is broken for it
        raise FedMaskError(f"devices that never sent an update: {', '.join(silent)}")
    return report


def _say_round(say: Any, info: RoundInfo) -> None:
    t = (info.closed_at or info.opened_at) - info.opened_at
    say(f"round {info.round_id:>3} closed in {t:5.1f}s: {len(info.received)}/{len(info.sampled)} received "
        f"(quorum {info.quorum}), {len(info.carried)} carried in, {len(info.late)} late")


def _wait_outstanding(store: RoundStore, fleet: Fleet, ids: list[str], timeout_s: float, say: Any) -> None:
    """Let slow boards finish the task they hold, so the report counts the work they did (their late
    update is handled by the policy like any other; no new round will merge it)."""
    last = store.current_round() or 0
    end = time.time() + timeout_s
    busy = store.busy(ids, last + 1, max_staleness=last + 1)
    if busy:
        say(f"waiting for {len(busy)} boards still training: {', '.join(sorted(busy))} ...")
    while busy and time.time() < end:
        fleet.check_alive()
        time.sleep(0.5)
        busy = store.busy(ids, last + 1, max_staleness=last + 1)


def _wait_last_masks(store: RoundStore, fleet: Fleet, profiles: dict[str, str], timeout_s: float = 30.0) -> None:
    """The last round's participants persist the mask they were sent before the fleet stops."""
    end = time.time() + timeout_s
    while time.time() < end:
        fleet.check_alive()
        pending = [d for d in profiles if _saved_version(fleet.state_dir, d) < store.mask_version(d)]
        if not pending:
            return
        time.sleep(0.3)


def _saved_version(state_dir: Path, device: str) -> int:
    path = state_dir / f"{device}.stats.jsonl"
    versions = [json.loads(line).get("version", 0) for line in path.read_text().splitlines()] if path.exists() else []
    return max(versions, default=0)


def summarize(rounds: list[RoundInfo], devices: dict[str, dict[str, Any]], counters: dict[str, int],
              s: DemoSettings, wall_s: float) -> dict[str, Any]:
    by_profile: dict[str, list[float]] = defaultdict(list)
    for d in devices.values():
        if d["median_turnaround_s"] is not None:
            by_profile[d["profile"]].append(d["median_turnaround_s"])
    durations = [(r.closed_at or r.opened_at) - r.opened_at for r in rounds]
    close = [r.close_seconds for r in rounds if r.close_seconds is not None]
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
        "wall_seconds": round(wall_s, 1),
        "rounds": [{"round": r.round_id, "seconds": round(t, 3), "sampled": len(r.sampled),
                    "received": len(r.received), "carried": len(r.carried), "late": len(r.late),
                    "arrivals": r.arrivals, "carried_devices": r.carried}
                   for r, t in zip(rounds, durations, strict=True)],
        "median_round_seconds": statistics.median(durations),
        "close_latency_ms": {"p50": 1e3 * float(np.percentile(close, 50)), "max": 1e3 * max(close)} if close else None,
        "turnaround_seconds_by_profile": {k: statistics.median(v) for k, v in sorted(by_profile.items())},
        "late": {"updates": sum(len(r.late) for r in rounds), "carried": counters.get("late:carried", 0),
                 "dropped": counters.get("late:dropped", 0), "expired": counters.get("late:expired", 0)},
        "devices": devices,
        "mean_accuracy_merged": float(np.mean([d["accuracy_merged"] for d in devices.values()])),
        "mean_accuracy_final": float(np.mean([d["accuracy_final"] for d in devices.values()])),
        "counters": counters,
    }


def render_table(report: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = report["devices"]
    colors = {"pi4": "tab:red", "jetson": "tab:blue"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    ax2.bar(x - 0.2, [devices[d]["accuracy_merged"] for d in names], 0.4, label="merged mask",
            color=[colors[devices[d]["profile"]] for d in names], alpha=0.5)
    ax2.bar(x + 0.2, [devices[d]["accuracy_final"] for d in names], 0.4, label="after final adaptation",
            color=[colors[devices[d]["profile"]] for d in names])
    ax2.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax2.set(ylabel="test accuracy (own data)", ylim=(0, 1), title="personalized accuracy per device")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
