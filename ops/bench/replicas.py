"""`fedmask bench pipeline --replicas N`: ingest with 1 and with N aggregator processes on one queue.

Each replica is a real `fedmask aggregator run` process (its own interpreter, so N replicas can use N
cores; threads in one process would share one GIL). A measurement: every replica is up and idle, all
are stopped (SIGSTOP), one round's updates are published (confirmed) into aggregator.uplink, all are
continued at once (SIGCONT), and the rate is the round's updates over SIGCONT -> `closing_at` (the
last update stored: the quorum-meeting one elects the closer). While stopped, the broker has already
pushed each replica up to its prefetch of the updates, as it would to a busy consumer.

Measurements alternate 1 replica / N replicas (the extra replicas are started for each N measurement,
warmed by two untimed rounds, since a fresh aggregator caches each board's structure and positions
on its first update, and stopped, gracefully, after it), so a change in load hits both alike; the median
ratio is reported with every pair. The in-process aggregator of the pipeline bench only opens the
rounds (its consumer is stopped meanwhile).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.bench.figures import host_load
from ops.control.rounds import wait_closed
from ops.fleet.emulated import BenchError

if TYPE_CHECKING:
    from ops.bench.pipeline import _PipelineRun

REPLICA_TARGET_RATIO = 1.6  # from the issue: 2 aggregators ingest >= 1.6x one


class _Replica:
    def __init__(self, run: _PipelineRun, name: str, folder: Path) -> None:
        self.log = folder / f"replica-{name}.log"
        cfg = run.cfg
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "aggregator", "run", "--amqp-url", run.box.admin_url,
                 "--redis-url", run.box.redis_url, "--task", cfg.task, "--width", str(run.model.width),
                 "--seed", str(cfg.seed), "--closer-id", f"bench-{name}", "--metrics-port", "0",
                 "--ack-durability", "unchecked"],  # the bench's Redis is the caller's: its durability is theirs
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_up(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while "aggregator up" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise BenchError(f"aggregator replica did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        time.sleep(0.5)  # "up" is logged as its consumers start: let them reach the broker

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _measure(run: _PipelineRun, replicas: list[_Replica]) -> float:
    """One round drained by `replicas` (all up and idle); updates per second to the last one stored."""
    for r in replicas:
        r.signal(signal.SIGSTOP)
    try:
        round_id, batch = run.open_round()
        run.publishers.publish(batch)
        time.sleep(0.3)  # the broker pushes the stopped consumers their prefetch
        start = time.time()
    finally:
        for r in replicas:
            r.signal(signal.SIGCONT)
    info = wait_closed(run.store, round_id, poll_s=0.01, timeout_s=run.cfg.timeout)
    assert info.closing_at is not None
    run.finish_round(info)
    return len(batch) / (info.closing_at - start)


def replica_ingest(run: _PipelineRun, n: int, repeats: int) -> dict[str, Any]:
    """Ingest with 1 and with `n` replicas, `repeats` alternating pairs (see the module docstring)."""
    if n < 2:
        raise BenchError("--replicas needs at least 2 (it compares N replicas with one)")
    run.stop_consumer()
    before = host_load()
    folder = Path(tempfile.mkdtemp(prefix="fedmask-bench-replicas-"))
    first = _Replica(run, "0", folder)
    extra: list[_Replica] = []
    one: list[float] = []
    many: list[float] = []
    try:
        first.wait_up(run.cfg.timeout)
        _measure(run, [first])  # warm-up: the replica's structure cache, not timed
        for _ in range(max(1, repeats)):
            one.append(_measure(run, [first]))
            extra = [_Replica(run, str(i), folder) for i in range(1, n)]
            for r in extra:
                r.wait_up(run.cfg.timeout)
            for _ in range(2):  # untimed: a fresh replica caches each board's structure on its first update
                _measure(run, [first, *extra])
            many.append(_measure(run, [first, *extra]))
            for r in extra:
                r.stop()
            extra = []
    finally:
        for r in [first, *extra]:
            r.stop()
    ratios = [m / o for o, m in zip(one, many, strict=True)]
    return {"replicas": n, "one_updates_per_s": one, f"{n}_updates_per_s": many,
            "ratio_median": statistics.median(ratios), "ratios": ratios, "target_ratio": REPLICA_TARGET_RATIO,
            "host": {**before, "loadavg_1m_after": host_load()["loadavg_1m"]}, "logs": str(folder)}
