"""`fedmask bench quorum`: who gets into a round's quorum, with and without a minimum wait.

A model of the pipeline's round membership, not a run of it: each round samples K boards (times the
over-selection) with the pipeline's own sampling, draws every tasked board's answer time, and decides
membership with shared.rounds.quorum_members, the rule close_round.lua applies. Honest boards answer
after base x profile factor x lognormal noise (a Jetson 1 s, a Pi 4 five times that, as the demo
emulates); one malicious board answers within milliseconds of every task. Reported per setting: how
often each kind of board is in the round when tasked, the malicious board's share of the merged
updates (its vote weight), how many updates a round merges, and when it closes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.device import derive_seed
from shared.rounds import quorum_count, quorum_members, sample_count, sample_devices

FAST = "malicious"


@dataclass(frozen=True)
class FleetModel:
    jetsons: int = 14
    pi4s: int = 6
    base_s: float = 1.0
    pi4_factor: float = 5.0
    noise_sigma: float = 0.3  # lognormal spread of one board's answer time
    fast_s: float = 0.01  # the malicious board


@dataclass(frozen=True)
class Setting:
    over_select: float
    min_wait: float

    @property
    def label(self) -> str:
        return f"over-select {self.over_select:g}, min wait {self.min_wait:g} s"


def _profiles(fleet: FleetModel) -> dict[str, str]:
    ids = {f"jetson-{i:02d}": "jetson" for i in range(fleet.jetsons)}
    ids.update({f"pi4-{i:02d}": "pi4" for i in range(fleet.pi4s)})
    ids[FAST] = FAST
    return ids


def run_setting(setting: Setting, fleet: FleetModel, *, rounds: int, devices: int, quorum: float,
                deadline_s: float, seed: int) -> dict[str, Any]:
    profiles = _profiles(fleet)
    pool = sorted(profiles)
    tasked = dict.fromkeys(pool, 0)
    inside = dict.fromkeys(pool, 0)
    fast_weight, merged, closes = [], [], []
    target = sample_count(len(pool), devices=devices)
    need = quorum_count(target, quorum)
    for r in range(1, rounds + 1):
        sampled = sample_devices(pool, sample_count(len(pool), devices=devices, over_select=setting.over_select),
                                 seed=seed, round_id=r)
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "answer", r)))
        arrivals = {}
        for d in sampled:
            tasked[d] += 1
            kind = profiles[d]
            factor = fleet.pi4_factor if kind == "pi4" else 1.0
            arrivals[d] = fleet.fast_s if kind == FAST else \
                fleet.base_s * factor * float(rng.lognormal(0.0, fleet.noise_sigma))
        members = quorum_members(arrivals, need, min_wait=setting.min_wait, deadline=deadline_s)
        for d in members:
            inside[d] += 1
        merged.append(len(members))
        times = sorted(arrivals.values())
        closes.append(min(max(times[need - 1] if len(times) >= need else math.inf, setting.min_wait), deadline_s))
        if FAST in sampled:
            fast_weight.append(1.0 / len(members))

    def share(kind: str) -> list[float]:
        return [inside[d] / tasked[d] for d in pool if profiles[d] == kind and tasked[d]]

    out: dict[str, Any] = {"setting": setting.label, "over_select": setting.over_select, "min_wait": setting.min_wait,
                           "quorum_updates": need, "merged_per_round": float(np.mean(merged)),
                           "close_s": float(np.mean(closes)),
                           "malicious_vote_share": float(np.mean(fast_weight)) if fast_weight else None}
    for kind in ("jetson", "pi4", FAST):
        s = share(kind)
        out[f"{kind}_in_quorum"] = {"mean": float(np.mean(s)), "min": float(np.min(s)),
                                    "max": float(np.max(s))} if s else None
    return out


def run_quorum_bench(settings: list[Setting], *, rounds: int = 2000, devices: int = 10, quorum: float = 0.8,
                     deadline_s: float = 60.0, seed: int = 0, fleet: FleetModel | None = None) -> dict[str, Any]:
    fleet = fleet or FleetModel()
    rows = [run_setting(s, fleet, rounds=rounds, devices=devices, quorum=quorum, deadline_s=deadline_s, seed=seed)
            for s in settings]
    return {"config": {"rounds": rounds, "devices": devices, "quorum": quorum, "deadline_s": deadline_s,
                       "seed": seed, "fleet": fleet.__dict__}, "rows": rows}


def format_quorum(result: dict[str, Any]) -> str:
    c = result["config"]
    f = c["fleet"]
    lines = ["| setting | in quorum when tasked: jetson mean (min) | pi4 mean (min) | malicious | "
             "malicious share of merged updates | updates merged per round | close (s) |", "|" + "---|" * 7]
    for r in result["rows"]:
        j, p, m = (_share(r[f"{k}_in_quorum"]) for k in ("jetson", "pi4", FAST))
        lines.append(f"| {r['setting']} | {j} | {p} | {m} | {r['malicious_vote_share']:.3f} | "
                     f"{r['merged_per_round']:.1f} "
                     f"(quorum {r['quorum_updates']}) | {r['close_s']:.2f} |")
    lines.append(f"\n{c['rounds']} rounds, K = {c['devices']} of {f['jetsons']} Jetsons, {f['pi4s']} Pi 4s and 1 "
                 f"malicious board (answers in {f['fast_s']:g} s), quorum {c['quorum']:g} of K, deadline "
                 f"{c['deadline_s']:g} s; Jetson answers {f['base_s']:g} s x lognormal(0, {f['noise_sigma']:g}), "
                 f"Pi 4 x{f['pi4_factor']:g}; seed {c['seed']}")
    return "\n".join(lines)


def _share(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['mean']:.2f} ({s['min']:.2f})"
