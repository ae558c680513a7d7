"""`fedmask bench pipeline`: the aggregator's ingest rate against the broker's own delivery rate, and
round close latency, for `devices` emulated devices x `params` model parameters.

Ingest: one round's updates are published (confirmed) into aggregator.uplink while no aggregator
consumes; then the service's own consumer path starts (AggregatorService.uplink_consumer: a
shared.amqp.BatchConsumer calling AggregatorService.on_batch, with the service's prefetch) and
drains them. Raw: the same bodies
in a scratch quorum queue, drained by a plain pika consumer (manual ack, same prefetch, no work).
Both rates are timed from the first delivery handed to the code under test; raw ends at the last
ack, ingest at the last update stored (`closing_at`: the quorum-meeting update elects the closer).
The drain including the close (`closed_at`) is reported next to it. The services share the host
with everything else running there, so `ingest_repeats` (ingest, raw) pairs are measured back to
back and the pair with the median ratio is reported, with every ratio. Once per run, the adapter
floor: the aggregator's consumer class with a handler that only acks, against raw, on a long
queue (ops/bench/adapter_floor.py); ingest can never beat it.

Close latency: `rounds` more rounds with quorum 1.0; per round closed_at - closing_at from Redis
(closer elected -> last merged mask confirmed by the broker). Device queues are purged after every
round; each must have held exactly its task and its merged mask.

The cost of durable acks (`durability`): "always" and/or "everysec" run the whole measurement against
a redis-server of the benchmark's own, started for it with broker_config/redis.conf's persistence
(appendonly yes, aof-use-rdb-preamble yes) and that appendfsync, its AOF in the system's temporary
folder (a disk here; on tmpfs an fsync costs nothing and the comparison means nothing); "both" runs
the two one after the other in one run, every other setting equal.
"""

from __future__ import annotations

import cProfile
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import redis

from aggregator.service import AggregatorService, ServiceSettings
from aggregator.store import RoundInfo, redact_url
from ops.bench.adapter_floor import adapter_floor
from ops.bench.figures import host_load, percentile, rate
from ops.bench.raw_broker import BrokerAdmin, raw_drain
from ops.bench.replicas import replica_ingest
from ops.bench.report import top_functions
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
from shared.amqp import AGGREGATOR_QUEUE, BatchConsumer, Delivery, Outcome, queue_depth

DURABILITY_CHOICES = ("", "always", "everysec", "both")  # "": the --redis-url as it is
INGEST_TARGET_RATIO = 0.7  # from the issue: ingest >= 0.7 x the broker's raw delivery rate
CLOSE_TARGET_SECONDS = 1.0  # from issue 11, at 100 devices x 1M parameters
CLOSE_TARGET_FLEET_SECONDS = 2.0  # from issue 14 (part 5), at 1,000 devices x 1M parameters


@dataclass(frozen=True)
class PipelineBenchConfig:
    devices: int = 100
    params: int = 1_000_000
    rounds: int = 20
    task: str = "activity"
    prefetch: int = ServiceSettings.prefetch  # the service's own default
    seed: int = 0
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = DEFAULT_REDIS_URL
    api_url: str = "http://127.0.0.1:15672"
    profile: bool = False
    ingest_repeats: int = 3
    floor_messages: int = 1000  # queue length for the adapter floor (see ops/bench/adapter_floor.py)
    publisher_threads: int = 8
    timeout: float = 300.0  # per wait (hellos, one round); a stuck pipeline fails instead of hanging
    durability: str = ""  # see the module docstring: "", "always", "everysec" or "both"
    replicas: int = 0  # > 1: also ingest with 1 and with this many aggregator processes (ops/bench/replicas.py)


class TimedHandler:
    """Wraps the service's batch handler (on_batch) and its after-batch closes: when the first delivery
    reached it, how long each batch took and how many deliveries it held. With `profile` the batches
    (storing updates) run under one cProfile and the closes they elected under another."""

    def __init__(self, inner: Callable[[list[Delivery]], list[Outcome | BaseException]],
                 after: Callable[[], None], profile: bool = False) -> None:
        self.inner, self.after = inner, after
        self.first_call: float | None = None  # time.time(), the clock RoundStore timestamps use
        self.durations: list[float] = []  # per batch
        self.sizes: list[int] = []
        self.ingest_profile = cProfile.Profile() if profile else None
        self.close_profile = cProfile.Profile() if profile else None

    def __call__(self, ds: list[Delivery]) -> list[Outcome | BaseException]:
        if self.first_call is None:
            self.first_call = time.time()
        start = time.perf_counter()
        p = self.ingest_profile
        out = p.runcall(self.inner, ds) if p is not None else self.inner(ds)
        self.durations.append(time.perf_counter() - start)
        self.sizes.append(len(ds))
        return out

    def after_batch(self) -> None:
        p = self.close_profile
        if p is not None:
            p.runcall(self.after)
        else:
            self.after()

    def per_update_ms(self) -> float:
        """Median handler time per delivery, over the batches."""
        return 1e3 * percentile([d / n for d, n in zip(self.durations, self.sizes, strict=True)], 50)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.01) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def run_pipeline_bench(cfg: PipelineBenchConfig,
                       on_round: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Run both measurements in one sandbox; returns the figures (see the module docstring). With
    `durability`, once per appendfsync policy against a redis-server of its own, figures by policy."""
    if cfg.durability not in DURABILITY_CHOICES:
        raise BenchError(f"durability must be one of always, everysec, both; got {cfg.durability!r}")
    if not cfg.durability:
        return _run_once(cfg, on_round)
    policies = ["always", "everysec"] if cfg.durability == "both" else [cfg.durability]
    by_policy = {}
    for policy in policies:
        with _private_redis(policy) as url:
            by_policy[policy] = _run_once(replace(cfg, redis_url=url), on_round)
            by_policy[policy]["appendfsync"] = policy
    out: dict[str, Any] = {"durability": by_policy,
                           "problems": [f"{k}: {p}" for k, r in by_policy.items() for p in r["problems"]]}
    if len(by_policy) == 2:
        out["fsync_cost"] = {
            "ingest_always_over_everysec": by_policy["always"]["ingest"]["updates_per_s"]
            / by_policy["everysec"]["ingest"]["updates_per_s"],
            "close_p50_always_minus_everysec_s": by_policy["always"]["close"]["p50_s"]
            - by_policy["everysec"]["close"]["p50_s"]}
    return out


@contextmanager
def _private_redis(appendfsync: str) -> Iterator[str]:
    """A redis-server of the benchmark's own on a free loopback port: AOF on with `appendfsync`, data in a
    temporary folder; shut down and removed afterwards."""
    if shutil.which("redis-server") is None:
        raise BenchError("--durability needs redis-server on PATH (it starts one of its own)")
    folder = Path(tempfile.mkdtemp(prefix=f"fedmask-bench-redis-{appendfsync}-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--appendfsync", appendfsync, "--aof-use-rdb-preamble", "yes",
                             "--save", "", "--logfile", str(folder / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        wait_for(lambda: _answers(client) or proc.poll() is not None, 30, "the benchmark's redis-server", poll=0.1)
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited {proc.returncode}; see {folder / 'redis.log'}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _run_once(cfg: PipelineBenchConfig, on_round: Callable[[int, float], None] | None) -> dict[str, Any]:
    model = BenchModel.for_params(cfg.task, cfg.params, cfg.seed)
    before = host_load()
    with sandbox(cfg.amqp_url, cfg.redis_url, cfg.api_url, cfg.devices) as box:
        run = _PipelineRun(cfg, model, box)
        try:
            result = run.measure(on_round)
        finally:
            run.close()
    result["host"] = {**before, "loadavg_1m_after": host_load()["loadavg_1m"]}
    return result


class _PipelineRun:
    """The aggregator service's consumer path in this process, and the emulated devices around it."""

    def __init__(self, cfg: PipelineBenchConfig, model: BenchModel, box: Sandbox) -> None:
        self.cfg, self.model, self.box, self.store = cfg, model, box, box.store
        self.ids = sorted(box.device_urls)
        self.devices: dict[str, EmulatedDevice] = make_devices(self.ids, model, cfg.seed)
        self.svc = AggregatorService(ServiceSettings(amqp_url=box.admin_url, redis_url=box.redis_url, task=cfg.task,
                                                     width=model.width, seed=cfg.seed, prefetch=cfg.prefetch))
        self.publishers = DevicePublishers(box.device_urls, cfg.publisher_threads)
        self.admin = BrokerAdmin(box.admin_url)
        self.consumer: BatchConsumer | None = None
        self.problems: list[str] = []
        self.last_batch: list[Outgoing] = []

    def close(self) -> None:
        self.stop_consumer()
        self.publishers.close()
        self.admin.close()
        self.svc.publisher.close()

    def start_consumer(self, handler: TimedHandler | None = None) -> None:
        """The service's own uplink consumer (AggregatorService.uplink_consumer), maybe timed."""
        self.consumer = self.svc.uplink_consumer()
        if handler is not None:
            self.consumer.batch_handler, self.consumer.after_batch = handler, handler.after_batch
        self.consumer.start_in_thread()
        if not self.consumer.wait_ready(30):
            raise BenchError("the aggregator consumer did not start within 30 s")

    def stop_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def open_round(self) -> tuple[int, list[Outgoing]]:
        """Open a round for every device (quorum 1.0) and draw each device's update for it."""
        with self.svc.lock:  # the service's lock: the consumer thread may be using the core
            opened = self.svc.core.start_round(rate=1.0, quorum=1.0, deadline_s=3600, seed=self.cfg.seed)
        return opened.round_id, [Outgoing(d, "update", self.devices[d].update(opened.round_id)) for d in self.ids]

    def finish_round(self, info: RoundInfo) -> None:
        """Every device was sampled and merged: its queue must hold exactly its task and its mask."""
        held = self.admin.purge_device_queues(self.ids)
        if wrong := {d: n for d, n in held.items() if n != 2}:
            self.problems.append(f"round {info.round_id}: device queues not holding task+mask: {wrong}")
        for d in info.received:
            self.devices[d].mask_version = info.round_id

    def enrol(self) -> None:
        """Hellos through the real consumer path."""
        self.start_consumer()
        self.publishers.publish([Outgoing(d, "hello", self.devices[d].hello()) for d in self.ids])
        wait_for(lambda: self.store.device_ids() == self.ids, self.cfg.timeout, "every hello to be stored", poll=0.05)

    def ingest_pair(self, profile: bool) -> tuple[dict[str, float], dict[str, float], TimedHandler]:
        """A full round waiting in the queue, drained by a freshly started consumer; then the same
        bodies drained raw."""
        self.stop_consumer()
        round_id, batch = self.open_round()
        self.publishers.publish(batch)
        if (depth := queue_depth(self.box.admin, AGGREGATOR_QUEUE)) != len(batch):
            raise BenchError(f"{depth} updates waiting in {AGGREGATOR_QUEUE}, expected {len(batch)}")
        handler = TimedHandler(self.svc.on_batch, self.svc.close_elected, profile=profile)
        self.start_consumer(handler)
        info = wait_closed(self.store, round_id, poll_s=0.01, timeout_s=self.cfg.timeout)
        assert handler.first_call is not None and info.closing_at is not None and info.closed_at is not None
        ingest = rate(len(batch), sum(len(m.body) for m in batch), info.closing_at - handler.first_call)
        ingest["seconds_incl_close"] = info.closed_at - handler.first_call
        ingest["handler_ms_median"] = handler.per_update_ms()
        ingest["batch_size_mean"] = statistics.fmean(handler.sizes)
        self.finish_round(info)
        raw = raw_drain(self.box.admin_url, [m.body for m in batch], self.cfg.prefetch)
        self.last_batch = batch
        return ingest, raw, handler

    def latency_round(self) -> float:
        """Devices publish while the aggregator consumes; the round closes on its last update."""
        round_id, batch = self.open_round()
        self.last_batch = batch
        self.publishers.publish(batch)
        info = wait_closed(self.store, round_id, poll_s=0.01, timeout_s=self.cfg.timeout)
        assert info.close_seconds is not None
        self.finish_round(info)
        return info.close_seconds

    def measure(self, on_round: Callable[[int, float], None] | None) -> dict[str, Any]:
        cfg = self.cfg
        self.enrol()
        # repeats 0: no full-queue drain (a round larger than aggregator.uplink's limits, UPLINK_LIMITS,
        # cannot wait in it whole: at 1,000 x 70 kB the broker nacks past 500 messages or 32 MB).
        pairs = [self.ingest_pair(profile=cfg.profile and k == 0) for k in range(cfg.ingest_repeats)]
        ratios = [ingest["updates_per_s"] / raw["updates_per_s"] for ingest, raw, _ in pairs]
        ingest, raw, _ = pairs[ratios.index(statistics.median_low(ratios))] if pairs else ({}, {}, None)
        floor = adapter_floor(self.box.admin_url, [m.body for m in self.last_batch], cfg.prefetch,
                              cfg.floor_messages) if pairs else {}
        self.stop_consumer()
        handler = TimedHandler(self.svc.on_batch, self.svc.close_elected, profile=cfg.profile and not pairs)
        self.start_consumer(handler)  # timed only where nothing else is: then the closes are profiled here
        profiled = pairs[0][2] if pairs else handler
        closes: list[float] = []
        for i in range(cfg.rounds):
            closes.append(self.latency_round())
            if on_round is not None:
                on_round(i + 1, closes[-1])
        replicas = replica_ingest(self, cfg.replicas, cfg.ingest_repeats) if cfg.replicas else None
        return {
            "replica_ingest": replicas,
            "config": {**asdict(cfg), "amqp_url": self.box.admin.redacted(), "redis_url": redact_url(cfg.redis_url),
                       "params_actual": self.model.nbits, "width": self.model.width,
                       "update_bytes_mean": statistics.fmean(len(m.body) for m in self.last_batch)},
            "ingest": ingest,
            "raw": raw,
            "ingest_over_raw": statistics.median_low(ratios) if ratios else None,
            "ingest_over_raw_all": ratios,
            "ingest_target_ratio": INGEST_TARGET_RATIO,
            "adapter_floor": floor,
            "close": {"rounds": len(closes), "p50_s": percentile(closes, 50), "p99_s": percentile(closes, 99),
                      "max_s": max(closes, default=float("nan")), "per_round_s": closes,
                      "target_s": CLOSE_TARGET_SECONDS if cfg.devices < 1000 else CLOSE_TARGET_FLEET_SECONDS},
            "device_queues": "purged after every round (outside the timed window); each held its task + mask",
            "profile": None if profiled.ingest_profile is None or profiled.close_profile is None else {
                "ingest_top": top_functions(profiled.ingest_profile),
                "close_top": top_functions(profiled.close_profile)},
            "problems": self.problems,
        }
