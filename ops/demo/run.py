"""The product's main job (`make demo`): a mixed Pi 4 / Jetson fleet trains FedMask through the
real pipeline, then each device's personalized model is scored on its own held-out data.

Steps: services up (local or Docker), a fresh vhost and Redis database, N enrolled worker
processes, R rounds closed on a quorum with late updates carried, every worker stopped, then a
table (accuracy, bytes, round time per profile, late updates) and a plot. It fails loudly if any
step did not happen: a round that did not close, a worker that died, a device with no merged mask.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.round_stats import history
from aggregator.store import RoundInfo, RoundStore
from ops.control.rounds import RoundPlan
from ops.demo.metrics_scrape import Scraper, free_port
from ops.fleet.workers import Fleet, FleetSpec, fleet_profiles, worker_stats
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
    api_url: str = "http://127.0.0.1:15672"  # the broker's management API (enrolment, the vhost's reset)
    out: Path = Path("runs/demo")
    strategy: str | None = None  # a weight-training strategy instead of FedMask (late updates then dropped)
    budget_s: float | None = None  # rounds: open no round after this many seconds; async: stop the stream then
    mode: str = "rounds"  # async: the aggregator's --mode async (ops/demo/async_run.py), no rounds
    buffer: int = 3  # async: flush every K stored updates
    staleness: str = "sqrt"  # async: vote weight by staleness (constant | sqrt)
    flushes: int = 12  # async: stop after this many flushes with every board merged (or at budget_s)

    def mode_line(self) -> str:
        """The one line saying which rhythm the demo runs and why (issue 13)."""
        if self.mode == "async":
            return (f"mode async (K={self.buffer}, max staleness {self.max_staleness}, {self.staleness} weights), "
                    "asked by --mode async: no rounds, each board gets its next task as soon as its update is "
                    "stored, so a slow board never holds the fast ones back")
        why = ("--quorum 1.0 asked: every round waits for the slowest board" if self.quorum >= 1.0 else
               "the default: rounds close without the slow boards and their late updates are "
               f"{'carried into the next round' if self.late == 'carry' else 'dropped'}; "
               "--mode async is the alternative (docs/results.md, Which rhythm)")
        return f"mode rounds (quorum {self.quorum}, late {self.late}): {why}"


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
                  **worker_stats(state_dir, d)}
    return out


def demo_profiles(s: DemoSettings, say: Any) -> dict[str, str]:
    from shared.data import load_task
    from shared.presets import preset

    p = preset(s.task)
    say(f"loading {s.task} data (the first run builds a cache under .data/) ...")
    ids = [d.device_id for d in load_task(s.task, num_devices=p.devices, seed=s.seed, **p.data_options).devices]
    return fleet_profiles(ids, s.workers, s.pi4)


def run_demo(s: DemoSettings, say: Any = print) -> dict[str, Any]:
    if s.mode == "async":
        if s.strategy is not None:
            raise FedMaskError("--mode async trains FedMask masks only: drop --strategy (strategies run in rounds)")
        from ops.demo.async_run import run_async_demo

        return run_async_demo(s, say)
    say(s.mode_line())
    profiles = demo_profiles(s, say)
    port = free_port()  # its own port: a deployment's aggregator may hold the default one
    spec = FleetSpec(task=s.task, devices=profiles, amqp_url=s.amqp_url, redis_url=s.redis_url,
                     run_dir=s.out, seed=s.seed, metrics_port=port, strategy=s.strategy, api_url=s.api_url,
                     planned_rounds=s.rounds if s.strategy else None)
    late = s.late
    if s.strategy is not None and late != "drop":
        say(f"strategy {s.strategy}: late updates are dropped, not carried (a weight update trained from an "
            "older model is not averaged into a newer one); slow boards rejoin the next round")
        late = "drop"
    plan = RoundPlan(rate=1.0, quorum=s.quorum, deadline_s=s.deadline_s, seed=s.seed, late=late,
                     max_staleness=s.max_staleness)
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    started = time.time()

    def on_round(info: RoundInfo) -> None:
        _say_round(say, info)
        scraper.scrape()  # as Prometheus would, while the run goes on

    with Fleet(spec, say=say) as fleet:
        scraper.scrape()
        run = fleet.run_rounds(s.rounds, plan, on_round=on_round, budget_s=s.budget_s)
        store = RoundStore.from_url(s.redis_url)
        fleet.wait_outstanding(s.deadline_s)
        fleet.wait_last_masks()
        scraper.scrape()  # the last one, before the aggregator stops
        counters = store.counters()
        # Re-read every round: late updates keep arriving (and are listed) after a round closed.
        final = [store.info(r.round_id) or r for r in run.rounds]
        learning = history(store)
    if s.strategy is None:
        devices = evaluate_devices(s.task, profiles, fleet.state_dir, s.seed)
    else:
        from ops.demo.strategy_eval import evaluate_strategy_devices

        devices = evaluate_strategy_devices(s.task, s.strategy, profiles, fleet.state_dir, s.seed, s.redis_url,
                                            s.rounds)
    report = summarize(final, devices, counters, s, time.time() - started)
    report["metrics"] = scraper.summary()
    report["learning"] = [{k: row[k] for k in ("round", "reported_stats", "mean_train_loss", "mean_train_accuracy",
                                               "mean_val_accuracy")} for row in learning]
    silent = [d for d, r in devices.items() if r["updates"] == 0]
    if silent:  # a board that never answered a task means the pipeline is broken for it
        raise FedMaskError(f"devices that never sent an update: {', '.join(silent)}")
    return report


def _say_round(say: Any, info: RoundInfo) -> None:
    t = (info.closed_at or info.opened_at) - info.opened_at
    say(f"round {info.round_id:>3} closed in {t:5.1f}s: {len(info.received)}/{len(info.sampled)} received "
        f"(quorum {info.quorum}), {len(info.carried)} carried in, {len(info.late)} late")


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
