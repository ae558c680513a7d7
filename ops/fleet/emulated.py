"""Emulated devices for the pipeline benchmarks (`fedmask bench pipeline|load`).

A `Sandbox` is a throwaway RabbitMQ vhost with one enrolled broker user per device (RabbitMQ checks
that user_id equals the connection's user, and the aggregator checks that user_id names the device,
so every device must publish over its own connection), plus a dedicated Redis DB for the
aggregator's default "fm:" prefix (the aggregator service has no prefix setting). Everything is
removed on exit: device users, the vhost with its queues, the DB's fm: keys.

An `EmulatedDevice` does not train: it draws its structure and its mask bits with a seeded numpy RNG
and encodes them with the project's codec exactly as shared.device.DeviceRuntime does, for the real
model spec's fingerprint and layout, so the aggregator validates them like any worker's messages.
The broker-side bookkeeping around them (purges, dead-letter reads) is ops/bench/raw_broker.py.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
import redis

from aggregator.store import RoundStore
from ops.control.enrolment import Management
from shared import codec
from shared.amqp import AmqpSettings, Publisher
from shared.bits import pad_mask, popcount
from shared.errors import FedMaskError
from shared.models import ModelSpec, build_model
from shared.presets import TASK_SHAPES, model_spec, preset
from shared.structures import StructureRule, random_structure, structure_rule

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/14"  # not db 0 (services) nor 15 (tests)
AGGREGATOR_PREFIX: Final = "fm:"  # RoundStore's default, the one `fedmask aggregator run` uses
LOCK_KEY: Final = "fedmask-bench:lock"
ENROLL_THREADS: Final = 8  # management API requests in flight; the broker hashes each password


class BenchError(FedMaskError):
    """The benchmark could not run (busy Redis DB, missing service) or its accounting failed."""


# ------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True, eq=False)
class BenchModel:
    """The real model the aggregator builds for (task, width): what emulated devices must match."""

    task: str
    width: int
    spec: ModelSpec
    fingerprint: str
    layout: str
    nbits: int
    pruned_region: np.ndarray  # bool, the last two layers: one-shot pruning thins only these
    structures: StructureRule  # what the aggregator accepts in a hello (rho 0.2 of the last two layers)

    @classmethod
    def for_params(cls, task: str, params: int, seed: int = 0) -> BenchModel:
        width = mlp_width_for(task, params)
        spec = model_spec(task, width=width, seed=seed)
        net = build_model(spec)
        return cls(task, width, spec, net.fingerprint(), net.layout_hash(), net.nbits,
                   net.region_of_last_layers(2).astype(bool), structure_rule(net, last_k=2, rho=0.2))


def mlp_width_for(task: str, params: int) -> int:
    """The width w whose mlp (in -> w -> w -> classes) has the parameter count nearest `params`."""
    if preset(task).arch != "mlp":
        raise BenchError(f"task {task!r} is not an mlp task; the benchmark sizes an mlp by width")
    shape, classes = TASK_SHAPES[task]
    d_in = math.prod(shape)
    # w^2 + (d_in + classes) w - params = 0, then the better of the two neighbouring integers.
    b = d_in + classes
    root = (-b + math.sqrt(b * b + 4 * params)) / 2
    return min((max(1, math.floor(root)), math.ceil(root)), key=lambda w: abs(w * w + b * w - params))


# ---------------------------------------------------------------------------------------- the devices


@dataclass
class EmulatedDevice:
    device_id: str
    model: BenchModel
    rng: np.random.Generator
    structure: np.ndarray = field(init=False)  # packed S_i: one pruning can produce, random kept elements
    inside: int = field(init=False)  # popcount(S_i): the bit count of every update
    mask_version: int = 0

    def __post_init__(self) -> None:
        self.structure = random_structure(self.model.structures, self.rng)
        self.inside = popcount(self.structure)

    def hello(self) -> bytes:
        m = self.model
        return codec.encode(codec.make_hello(device=self.device_id, round=0, model=m.fingerprint, layout=m.layout,
                                             structure=self.structure.tobytes(), nbits=m.nbits))

    def update(self, round_id: int, *, nbits: int | None = None) -> bytes:
        """A "trained" mask: random bits inside the structure. `nbits` other than `inside` makes a
        well-formed update of the wrong length (the aggregator must reject it as bad_length)."""
        n = self.inside if nbits is None else nbits
        bits = self.rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
        if bits.size:
            bits[-1] &= pad_mask(n)  # the codec insists on zero padding bits
        m = self.model
        return codec.encode(codec.make_update(
            device=self.device_id, round=round_id, model=m.fingerprint, layout=m.layout, bits=bits.tobytes(),
            nbits=n, version=self.mask_version, stats=codec.Stats(samples=64, loss=0.5, accuracy=0.5)))


def make_devices(ids: Sequence[str], model: BenchModel, seed: int) -> dict[str, EmulatedDevice]:
    return {d: EmulatedDevice(d, model, np.random.default_rng([seed, i])) for i, d in enumerate(ids)}


@dataclass(frozen=True)
class Outgoing:
    device_id: str
    kind: str  # "hello" | "update"
    body: bytes


class DevicePublishers:
    """One confirmed Publisher per device (its own user and connection), opened on first use. Messages
    are split by device over a few threads, so one device's messages keep their order and a
    connection is only ever used by one thread."""

    def __init__(self, device_urls: dict[str, str], threads: int = 8) -> None:
        self._urls = device_urls
        self._index = {d: i for i, d in enumerate(sorted(device_urls))}
        self._publishers: dict[str, Publisher] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-device")
        self.threads = threads

    def publish(self, messages: Sequence[Outgoing]) -> None:
        buckets: list[list[Outgoing]] = [[] for _ in range(self.threads)]
        for m in messages:
            buckets[self._index[m.device_id] % self.threads].append(m)
        for done in [self._pool.submit(self._publish_bucket, b) for b in buckets if b]:
            done.result()  # re-raises a failed publish here

    def _publish_bucket(self, bucket: list[Outgoing]) -> None:
        for m in bucket:
            pub = self._publishers.get(m.device_id)
            if pub is None:
                pub = self._publishers[m.device_id] = Publisher(AmqpSettings.from_url(self._urls[m.device_id]))
            pub.publish_uplink(m.device_id, m.kind, m.body)  # user_id = the connection's own user

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for pub in self._publishers.values():
            pub.close()
        self._publishers.clear()


# ------------------------------------------------------------------------------------------ isolation


def with_path(url: str, path: str) -> str:
    """`url` with its path (the AMQP vhost, the Redis db) replaced."""
    return urlunsplit(urlsplit(url)._replace(path="/" + path))


@dataclass
class Sandbox:
    mgmt: Management
    vhost: str
    admin_url: str  # the broker's admin user on the throwaway vhost
    redis_url: str
    store: RoundStore  # the aggregator's keys (prefix fm:) in the dedicated DB
    device_urls: dict[str, str]  # device id -> AMQP URL with the device's own credentials

    @property
    def admin(self) -> AmqpSettings:
        return AmqpSettings.from_url(self.admin_url)


@contextmanager
def sandbox(amqp_url: str, redis_url: str, api_url: str, devices: int) -> Iterator[Sandbox]:
    """Enrol `devices` emulated devices on a fresh vhost, claim the Redis DB; clean up on exit."""
    run = uuid.uuid4().hex[:6]
    vhost = f"fedmask-bench-{run}"
    ids = [f"b{run}-{i:04d}" for i in range(devices)]  # unique per run: broker users are global
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    if not client.set(LOCK_KEY, vhost, nx=True, ex=6 * 3600):
        raise BenchError(f"Redis {redis_url} is in use by another benchmark ({LOCK_KEY} is set); "
                         "wait, or pass another database with --redis-url")
    if any(True for _ in client.scan_iter(match=f"{AGGREGATOR_PREFIX}*".encode(), count=100)):
        client.delete(LOCK_KEY)
        raise BenchError(f"Redis {redis_url} already holds {AGGREGATOR_PREFIX}* keys that are not this "
                         "benchmark's; pass an empty database with --redis-url")
    admin = urlsplit(amqp_url)  # the management API is used as the same admin user as AMQP
    mgmt = Management(api_url, unquote(admin.username or "guest"), unquote(admin.password or "guest"))
    vhost_created = False
    try:
        mgmt.ensure_vhost(vhost)
        vhost_created = True
        with ThreadPoolExecutor(ENROLL_THREADS) as pool:
            creds = list(pool.map(lambda d: mgmt.enroll(d, vhost=vhost, amqp_host=admin.hostname or "127.0.0.1",
                                                        amqp_port=admin.port or 5672), ids))
        yield Sandbox(mgmt, vhost, with_path(amqp_url, quote(vhost, safe="")), redis_url,
                      RoundStore(client, AGGREGATOR_PREFIX), {c.device_id: c.amqp_url for c in creds})
    finally:
        if vhost_created:  # users outlive vhosts: delete them one by one (missing ones are fine)
            with ThreadPoolExecutor(ENROLL_THREADS) as pool:
                list(pool.map(lambda d: mgmt.delete_device(d, vhost=vhost, delete_queue=False), ids))
            mgmt.delete_vhost(vhost)
        for key in client.scan_iter(match=f"{AGGREGATOR_PREFIX}*".encode(), count=1000):
            client.delete(key)
        client.delete(LOCK_KEY)
        client.close()
