"""`fedmask bench load`: many lightweight emulated devices against the real aggregator process.

The aggregator runs as a subprocess (`python -m ops.cli aggregator run`), so its peak memory is its
own: VmHWM from /proc/<pid>/status, read just before it is stopped. Each round is opened with a
sample rate, a quorum and a short deadline; every sampled device publishes its update, and about
`bad_rate` more messages are injected so that every rejection path runs:

  duplicate      a sampled device's update published twice  -> acked, counted updates:duplicate
  wrong_length   a well-formed update with one bit too few   -> dead-lettered, bad_length
  not_sampled    an update from a device not asked this round -> dead-lettered, not_sampled
  undecodable    bytes that are not msgpack                  -> dead-lettered, undecodable

Updates that miss the quorum close are dead-lettered too (round_closed). Accounting: every update
message sent must be merged, rejected with a reason, or acked as a duplicate; the rejections must
match the dead letters (x-reject-reason) one for one. Anything else is reported as a problem.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.core import AggregatorCore
from aggregator.store import RoundInfo, RoundStore, redact_url
from ops.bench.figures import host_load, percentile
from ops.bench.pipeline import wait_for
from ops.bench.raw_broker import BrokerAdmin
from ops.control.rounds import wait_closed
from ops.fleet.emulated import (
    DEFAULT_REDIS_URL,
    BenchError,
    BenchModel,
    DevicePublishers,
    EmulatedDevice,
    Outgoing,
    Sandbox,
    make_devices,
    sandbox,
)
from shared.amqp import Publisher

BAD_KINDS = ("duplicate", "wrong_length", "not_sampled", "undecodable")
# The rejection reason each injected kind must produce, whatever the timing (duplicates may also
# meet a closed round, so they are checked by the overall accounting only).
EXPECTED_REASON = {"wrong_length": "bad_length", "not_sampled": "not_sampled", "undecodable": "undecodable"}


@dataclass(frozen=True)
class LoadBenchConfig:
    devices: int = 500
    rounds: int = 20
    params: int = 20_000
    task: str = "activity"
    sample_rate: float = 0.5
    quorum: float = 0.8
    deadline: float = 10.0  # seconds; rounds normally close on quorum well before
    bad_rate: float = 0.02  # injected bad messages per valid update
    seed: int = 0
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = DEFAULT_REDIS_URL
    api_url: str = "http://127.0.0.1:15672"
    publisher_threads: int = 8
    timeout: float = 60.0  # per wait; past it the round's missing messages are reported as vanished


def plan_round(info: RoundInfo, devices: dict[str, EmulatedDevice], bad_rate: float,
               rng: np.random.Generator) -> tuple[list[Outgoing], Counter[str]]:
    """The round's update messages: one valid update per sampled device plus the injected bad ones."""
    r, sampled = info.round_id, info.sampled
    valid = {d: devices[d].update(r) for d in sampled}
    msgs = [Outgoing(d, "update", body) for d, body in valid.items()]
    outsiders = sorted(set(devices) - set(sampled))
    injected: Counter[str] = Counter()
    for k in range(math.ceil(bad_rate * len(sampled))):
        kind = BAD_KINDS[(k + r) % len(BAD_KINDS)]  # rotate, so small runs still see every kind
        if kind == "not_sampled" and not outsiders:
            kind = "undecodable"
        if kind == "duplicate":
            d = str(rng.choice(sampled))
            msgs.append(Outgoing(d, "update", valid[d]))
        elif kind == "wrong_length":
            dev = devices[str(rng.choice(sampled))]
            msgs.append(Outgoing(dev.device_id, "update", dev.update(r, nbits=dev.inside - 1)))
        elif kind == "not_sampled":
            d = str(rng.choice(outsiders))
            msgs.append(Outgoing(d, "update", devices[d].update(r)))
        else:
            msgs.append(Outgoing(str(rng.choice(sampled)), "update", b"\xc1" + rng.bytes(32)))  # 0xc1: never msgpack
        injected[kind] += 1
    rng.shuffle(msgs)  # type: ignore[arg-type, unused-ignore]
    return msgs, injected


def handled(counters: dict[str, int]) -> int:
    """Update messages the aggregator has settled: stored, acked as duplicates, or rejected."""
    rejected = sum(v for k, v in counters.items() if k.startswith("rejected:"))
    return counters.get("updates:stored", 0) + counters.get("updates:duplicate", 0) + rejected


def all_handled(store: RoundStore, sent: int) -> bool:
    return handled(store.counters()) >= sent


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MB; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def collect_dead_letters(admin: BrokerAdmin, expected: int, timeout: float) -> Counter[str]:
    """Dead letters by reason. The reject counter is bumped before the consumer commits the dead
    letter's publish and the ack, so the last few may still be landing: read until `expected` arrived."""
    dead: Counter[str] = Counter()
    end = time.monotonic() + timeout
    while True:
        dead.update(admin.dead_letter_reasons())
        if sum(dead.values()) >= expected or time.monotonic() > end:
            return dead
        time.sleep(0.1)


def start_aggregator(box: Sandbox, model: BenchModel, seed: int, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ops.cli", "aggregator", "run", "--amqp-url", box.admin_url, "--redis-url",
           box.redis_url, "--task", model.task, "--width", str(model.width), "--seed", str(seed),
           "--ack-durability", "unchecked"]  # the benchmark's Redis is the developer's own
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_aggregator(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the service drains on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load_bench(cfg: LoadBenchConfig, on_round: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    model = BenchModel.for_params(cfg.task, cfg.params, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="fedmask-bench-load-") as tmp, \
            sandbox(cfg.amqp_url, cfg.redis_url, cfg.api_url, cfg.devices) as box:
        log_path = Path(tmp) / "aggregator.log"
        proc = start_aggregator(box, model, cfg.seed, log_path)
        before = host_load()
        try:
            result = _run(cfg, model, box, proc, on_round)
            result["host"] = {**before, "loadavg_1m_after": host_load()["loadavg_1m"]}
            return result
        except BenchError as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise BenchError(f"{exc}\naggregator log (last lines):\n" + "\n".join(tail)) from exc
        finally:
            stop_aggregator(proc)


def _run(cfg: LoadBenchConfig, model: BenchModel, box: Sandbox, proc: subprocess.Popen[bytes],
         on_round: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    ids = sorted(box.device_urls)
    devices = make_devices(ids, model, cfg.seed)
    store: RoundStore = box.store
    rng = np.random.default_rng([cfg.seed, 1])
    publishers = DevicePublishers(box.device_urls, cfg.publisher_threads)
    admin = BrokerAdmin(box.admin_url)
    downlink = Publisher(box.admin)
    core = AggregatorCore(store, downlink, model.spec)  # only opens rounds, as `fedmask round start` does
    problems: list[str] = []
    rounds: list[RoundInfo] = []
    injected: Counter[str] = Counter()
    sent = 0
    active = 0.0  # seconds from a round's first publish to its last message handled

    def alive_and(cond: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"the aggregator process exited with code {proc.returncode}")
            return cond()
        return check

    try:
        publishers.publish([Outgoing(d, "hello", devices[d].hello()) for d in ids])
        wait_for(alive_and(lambda: store.device_ids() == ids), cfg.timeout, "every hello to be stored", poll=0.1)
        for i in range(cfg.rounds):
            opened = core.start_round(rate=cfg.sample_rate, quorum=cfg.quorum, deadline_s=cfg.deadline, seed=cfg.seed)
            msgs, bad = plan_round(opened, devices, cfg.bad_rate, rng)
            injected += bad
            start = time.perf_counter()
            publishers.publish(msgs)
            sent += len(msgs)
            try:
                wait_for(alive_and(functools.partial(all_handled, store, sent)), cfg.timeout,
                         f"round {opened.round_id}'s messages to be handled", poll=0.01)
            except BenchError as exc:
                problems.append(str(exc))
                break
            info = wait_closed(store, opened.round_id, poll_s=0.01, timeout_s=cfg.deadline + cfg.timeout)
            active += time.perf_counter() - start
            rounds.append(info)
            for d in info.received:
                devices[d].mask_version = info.round_id
            held = admin.purge_device_queues(ids)  # each sampled device: its task, and its mask if merged
            expected = {d: (d in info.sampled) + (d in info.received) for d in ids}
            if wrong := {d: (held[d], n) for d, n in expected.items() if held[d] != n}:
                problems.append(f"round {info.round_id}: device queues (held, expected): {wrong}")
            if on_round is not None and info.close_seconds is not None:
                on_round(i + 1, info.close_seconds)
        peak = peak_rss_mb(proc.pid)
        counters = store.counters()
        rejected = {k.removeprefix("rejected:"): v for k, v in counters.items() if k.startswith("rejected:")}
        dead = collect_dead_letters(admin, sum(rejected.values()), timeout=10.0)
    finally:
        publishers.close()
        admin.close()
        downlink.close()

    merged = sum(len(info.received) for info in rounds)
    duplicates = counters.get("updates:duplicate", 0)
    vanished = sent - merged - sum(rejected.values()) - duplicates
    if vanished:
        problems.append(f"{vanished} update messages vanished: sent {sent} != merged {merged} + rejected "
                        f"{sum(rejected.values())} + duplicates {duplicates}")
    if counters.get("updates:stored", 0) != merged:
        problems.append(f"updates:stored {counters.get('updates:stored', 0)} != merged {merged}")
    if dict(dead) != rejected:
        problems.append(f"dead letters by reason {dict(dead)} != rejections by reason {rejected}")
    for kind, reason in EXPECTED_REASON.items():
        if injected[kind] != rejected.get(reason, 0):
            problems.append(f"injected {injected[kind]} {kind}, but {rejected.get(reason, 0)} rejected as {reason}")
    closes = [info.close_seconds for info in rounds if info.close_seconds is not None]
    return {
        "config": {**asdict(cfg), "amqp_url": box.admin.redacted(), "redis_url": redact_url(cfg.redis_url),
                   "params_actual": model.nbits, "width": model.width},
        "rounds_completed": len(rounds),
        "accounting": {"sent": sent, "merged": merged, "rejected": sum(rejected.values()),
                       "duplicates_acked": duplicates, "vanished": vanished, "rejected_by_reason": rejected,
                       "dead_letters_by_reason": dict(dead), "injected": dict(injected),
                       "late": sum(len(info.late) for info in rounds)},
        "throughput": {"updates": sent, "seconds": active, "updates_per_s": sent / active if active else 0.0},
        "close": {"p50_s": percentile(closes, 50), "p99_s": percentile(closes, 99),
                  "max_s": max(closes, default=float("nan")),
                  "by_deadline": sum(1 for info in rounds if info.closing_at is not None
                                     and info.closing_at >= info.deadline)},
        "aggregator_peak_rss_mb": peak,
        "memory_method": "VmHWM of the aggregator subprocess (/proc/<pid>/status), read before SIGTERM",
        "device_queues": "purged after every round; each held its task (if sampled) and its mask (if merged)",
        "problems": problems,
    }

