"""`fedmask demo --mode async`: the demo fleet with the aggregator in async mode (issue 13), no rounds.

The operator side opens nothing: the aggregator sends task 1 on each hello and the next task as soon
as a board's update is stored, and every K stored updates a flush sends each buffered board its
merged mask (aggregator/core_async.py). The demo only watches the stream's state in Redis
(aggregator/store_async.py) until F flushes happened with every board merged at least once, or the
time budget ran out; it fails loudly if no flush happened at all or a worker died. Then the stream is
frozen (the aggregator drains and stops, so Redis holds its final state), the boards apply the masks
already in their queues, the workers stop and every device is scored exactly as the rounds demo does.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import numpy as np

from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore
from ops.control.async_status import async_summary
from ops.demo.curves import fleet_curve
from ops.demo.metrics_scrape import Scraper, free_port
from ops.demo.run import DemoSettings, demo_profiles, evaluate_devices
from ops.fleet.workers import Fleet, FleetSpec
from ops.services.aggregator_process import stop_aggregator
from shared.errors import FedMaskError

SCRAPE_EVERY_S = 5.0  # as a Prometheus scrape interval would; there is no round close to hook onto


def run_async_demo(s: DemoSettings, say: Any = print) -> dict[str, Any]:
    say(s.mode_line())
    profiles = demo_profiles(s, say)
    port = free_port()
    spec = FleetSpec(task=s.task, devices=profiles, amqp_url=s.amqp_url, redis_url=s.redis_url, run_dir=s.out,
                     seed=s.seed, metrics_port=port, mode="async", buffer=s.buffer, max_staleness=s.max_staleness,
                     staleness=s.staleness, api_url=s.api_url)
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    started = time.time()
    with Fleet(spec, say=say) as fleet:
        store = RoundStore.from_url(s.redis_url)
        stream = AsyncStore(store)
        scraper.scrape()
        watch_stream(fleet, stream, s, scraper, say)
        scraper.scrape()  # the last one, before the aggregator stops
        # Freeze the stream: SIGTERM drains the delivery in hand, so what Redis says is final and no
        # flush happens after this read; the boards still apply the masks already queued for them.
        stop_aggregator(fleet.deployment, say)
        frozen = time.time()  # updates sent after this were never stored: the curve ends here
        summary = async_summary(store)
        flushes = stream.flushes()
        counters = store.counters()
        fleet.wait_last_masks()
    devices = evaluate_devices(s.task, profiles, fleet.state_dir, s.seed)
    silent = [d for d, r in devices.items() if r["updates"] == 0]
    if silent:  # a board that never answered a task means the pipeline is broken for it
        raise FedMaskError(f"devices that never sent an update: {', '.join(silent)}")
    curve = fleet_curve(fleet.state_dir, profiles, until=frozen)
    report = summarize_async(flushes, summary, devices, counters, s, time.time() - started)
    report["metrics"] = scraper.summary()
    report["learning_over_time"] = curve["curve"]
    report["timeline"] = timeline(fleet.state_dir, profiles, curve["t0"])
    return report


def watch_stream(fleet: Fleet, stream: AsyncStore, s: DemoSettings, scraper: Scraper, say: Any) -> None:
    """Until F flushes with every board merged at least once (or s.budget_s); say each new flush."""
    boards = set(fleet.spec.devices)
    limit = s.budget_s if s.budget_s is not None else s.deadline_s
    goal = (f"for {s.budget_s:.0f}s" if s.budget_s is not None else
            f"until {s.flushes} flushes with every board merged (at most {s.deadline_s:.0f}s)")
    say(f"no rounds to open: the aggregator tasks each board itself; watching the stream {goal} ...")
    start = last_scrape = time.time()
    seen = 0
    merged: set[str] = set()
    while True:
        fleet.check_alive()
        # By version, not by position: Redis keeps only the last FLUSH_KEEP records (store_async.py).
        for f in stream.flushes():
            if int(f["version"]) <= seen:  # type: ignore[call-overload]
                continue
            devs = [str(d) for d in f["devices"]]  # type: ignore[attr-defined]
            merged.update(devs)
            say(f"flush v{f['version']} at {time.time() - start:5.1f}s: {len(devs)} buffered merged "
                f"({', '.join(devs)}), {f['voters']} voters; {len(merged)}/{len(boards)} boards merged so far")
            seen = int(f["version"])  # type: ignore[call-overload]
        now = time.time()
        if now - last_scrape >= SCRAPE_EVERY_S:
            scraper.scrape()
            last_scrape = now
        if s.budget_s is None and seen >= s.flushes and merged >= boards:
            return
        if now - start >= limit:
            break
        time.sleep(0.3)
    if seen == 0:
        raise FedMaskError(f"no flush within {limit:.0f}s: the stream stored fewer than K={s.buffer} updates "
                           "(see the aggregator's log)")
    if s.budget_s is None:
        say(f"stopping at {limit:.0f}s with {seen} flushes; boards never merged: "
            f"{', '.join(sorted(boards - merged)) or 'none'}")


def timeline(state_dir: Any, profiles: dict[str, str], t0: float | None) -> dict[str, dict[str, list[float]]]:
    """Per board, seconds since the first task at which it sent an update and applied a merged mask."""
    from ops.demo.curves import records

    if t0 is None:
        return {}
    out: dict[str, dict[str, list[float]]] = {}
    for d in profiles:
        recs = records(state_dir, d)
        out[d] = {"updates": [round(r["t"] - t0, 2) for r in recs if r["type"] == "update"],
                  "masks": [round(r["t"] - t0, 2) for r in recs if r["type"] == "mask"]}
    return out


def summarize_async(flushes: list[dict[str, object]], stream: dict[str, Any], devices: dict[str, dict[str, Any]],
                    counters: dict[str, int], s: DemoSettings, wall_s: float) -> dict[str, Any]:
    by_profile: dict[str, list[float]] = defaultdict(list)
    for r in devices.values():
        if r["median_turnaround_s"] is not None:
            by_profile[r["profile"]].append(r["median_turnaround_s"])
    in_flushes: dict[str, int] = defaultdict(int)
    for f in flushes:
        for member in f["devices"]:  # type: ignore[attr-defined]
            in_flushes[str(member)] += 1
    for dev, row in devices.items():
        row["flushes"] = in_flushes.get(dev, 0)
    return {
        "settings": {k: str(v) if k == "out" else v for k, v in s.__dict__.items()},
        "mode": "async",
        "wall_seconds": round(wall_s, 1),
        "flushes": flushes,
        "stream": stream,
        "turnaround_seconds_by_profile": {k: statistics.median(v) for k, v in sorted(by_profile.items())},
        "devices": devices,
        "mean_accuracy_merged": float(np.mean([d["accuracy_merged"] for d in devices.values()])),
        "mean_accuracy_final": float(np.mean([d["accuracy_final"] for d in devices.values()])),
        "counters": counters,
    }
