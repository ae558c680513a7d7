"""Learning over wall-clock time from the boards' own records (<state>/<device>.stats.jsonl).

Each update a worker sends is logged with its time `t` and the validation accuracy the board measured
on its own split (worker/runtime.py). The same reading serves every rhythm (rounds, quorum, async), so
the curves compare: at time t a board counts with the accuracy of its latest update sent by t, and
the fleet's mean is over the boards that have sent one; the time to a target counts only once every
board has (a fleet whose slow boards never reported has not reached anything).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def records(state_dir: Path, device: str) -> list[dict[str, Any]]:
    path = state_dir / f"{device}.stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_time(state_dir: Path, devices: list[str]) -> float | None:
    """The first task any board received: training starts there in every mode."""
    ts = [r["t"] for d in devices for r in records(state_dir, d) if r["type"] == "task"]
    return min(ts) if ts else None


def val_points(state_dir: Path, device: str, t0: float) -> list[tuple[float, float]]:
    """(seconds since t0, validation accuracy) per update the board sent and measured."""
    return [(r["t"] - t0, float(r["val_accuracy"])) for r in records(state_dir, device)
            if r["type"] == "update" and r.get("val_accuracy") is not None and not r.get("resent")]


def mean_curve(points: dict[str, list[tuple[float, float]]], grid: list[float]) -> list[dict[str, Any]]:
    """At each grid time: the mean of each board's latest validation accuracy, and how many boards count."""
    out = []
    for t in grid:
        latest = [max(p, key=lambda x: x[0])[1] for p in ([x for x in pts if x[0] <= t] for pts in points.values())
                  if p]
        out.append({"t": round(t, 1), "boards": len(latest),
                    "mean_val_accuracy": sum(latest) / len(latest) if latest else None})
    return out


def at(points: list[tuple[float, float]], t: float) -> float | None:
    """One board's accuracy at time t: that of its latest update sent by then."""
    before = [x for x in points if x[0] <= t]
    return max(before, key=lambda x: x[0])[1] if before else None


def time_to(curve: list[dict[str, Any]], target: float, boards: int) -> float | None:
    """The first grid time at which every board has reported and the mean is at least `target`."""
    for row in curve:
        if row["boards"] == boards and row["mean_val_accuracy"] is not None and row["mean_val_accuracy"] >= target:
            return float(row["t"])
    return None


def fleet_curve(state_dir: Path, profiles: dict[str, str], horizon_s: float | None = None,
                step_s: float = 5.0, until: float | None = None) -> dict[str, Any]:
    """The fleet's mean validation accuracy every `step_s` seconds from its first task up to `horizon_s`
    after it (or up to the wall-clock time `until`; neither: its last update), and each board's points,
    for a report or a comparison of rhythms."""
    devices = list(profiles)
    t0 = start_time(state_dir, devices)
    if t0 is None:
        return {"t0": None, "curve": [], "points": {}}
    if until is not None:
        horizon_s = max(0.0, until - t0)
    points = {d: val_points(state_dir, d, t0) for d in devices}
    end = horizon_s if horizon_s is not None else max((p[-1][0] for p in points.values() if p), default=0.0)
    n = int(end // step_s)
    grid = [i * step_s for i in range(n + 1)] + ([end] if end > n * step_s else [])
    return {"t0": t0, "horizon_s": end, "curve": mean_curve(points, grid), "points": points}
