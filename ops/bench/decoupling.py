"""`fedmask bench decoupling`: do slow boards hold back a round?

Two fleets of the same size run the same rounds through the real pipeline: a mixed one (some
emulated Pi 4 boards, 5x slower) and an all-Jetson one. With a quorum below 1, a round should close
on the fast boards' updates, so the mixed fleet's median round time should stay close to the
all-Jetson fleet's (the issue's target: within 1.3x at 3 of 10 Pi 4 boards, quorum 0.7).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from ops.control.rounds import RoundPlan
from ops.fleet.workers import Fleet, FleetSpec, fleet_profiles
from shared.presets import preset


def run_fleet(task: str, profiles: dict[str, str], rounds: int, plan: RoundPlan, *, amqp_url: str, redis_url: str,
              run_dir: Path, say: Any) -> dict[str, Any]:
    spec = FleetSpec(task=task, devices=profiles, amqp_url=amqp_url, redis_url=redis_url, run_dir=run_dir,
                     vhost="fedmask-bench", seed=plan.seed)
    with Fleet(spec, say=say) as fleet:
        run = fleet.run_rounds(rounds, plan, on_round=lambda i: say(
            f"  round {i.round_id}: {len(i.received)}/{len(i.sampled)} in {(i.closed_at or 0) - i.opened_at:.1f}s"))
    times = run.durations()
    return {"profiles": profiles, "round_seconds": [round(t, 3) for t in times],
            "median_round_seconds": statistics.median(times),
            "sampled_per_round": [len(r.sampled) for r in run.rounds],
            "carried": sum(len(r.carried) for r in run.rounds), "late": sum(len(r.late) for r in run.rounds)}


def run_decoupling_bench(*, task: str = "activity", devices: int = 10, pi4: int = 3, rounds: int = 8,
                         quorum: float = 0.7, late: str = "carry", amqp_url: str, redis_url: str, out: Path,
                         say: Any = print) -> dict[str, Any]:
    from shared.data import load_task

    p = preset(task)
    ids = [d.device_id for d in load_task(task, num_devices=p.devices, seed=0, **p.data_options).devices]
    plan = RoundPlan(rate=1.0, quorum=quorum, deadline_s=300.0, late=late, max_staleness=2)
    started = time.time()
    results = {}
    for name, n_pi4 in (("mixed", pi4), ("all_jetson", 0)):
        say(f"fleet {name}: {n_pi4} pi4 + {devices - n_pi4} jetson, {rounds} rounds, quorum {quorum}")
        results[name] = run_fleet(task, fleet_profiles(ids, devices, n_pi4), rounds, plan, amqp_url=amqp_url,
                                  redis_url=redis_url, run_dir=out / name, say=say)
    ratio = results["mixed"]["median_round_seconds"] / results["all_jetson"]["median_round_seconds"]
    return {"task": task, "devices": devices, "pi4": pi4, "rounds": rounds, "quorum": quorum, "late": late,
            **results, "median_ratio": ratio, "target_ratio": 1.3, "met": ratio <= 1.3,
            "wall_seconds": round(time.time() - started, 1)}
