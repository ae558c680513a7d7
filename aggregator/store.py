"""RoundStore: the only code that talks to Redis about devices and rounds.

The key layout and the Lua scripts are aggregator/store_keys.py; building a client from a URL (and
the TLS rules) is aggregator/redis_url.py.

Errors: any redis-py error becomes a StoreError at this boundary; messages never carry the password.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

import redis

from aggregator.redis_url import client_from_url, replicas_to_wait
from aggregator.redis_url import redact_url as redact_url
from aggregator.store_batch import INCOMING_TTL_MS, WAIT_TIMEOUT_MS, BatchIngest
from aggregator.store_closer import CloseLease
from aggregator.store_devices import DeviceLifecycle
from aggregator.store_durability import AckDurability, read_ack_durability
from aggregator.store_keys import StoreKeys, register_scripts
from aggregator.store_pending import PendingUpdates
from shared.errors import ConfigError, FedMaskError
from shared.rounds import UpdateStatus

STATES: Final = ("open", "closing", "closed")
CarryStatus = Literal["carried", "duplicate", "sampled", "closed", "unknown_round"]
_UPDATE_STATUSES: Final = get_args(UpdateStatus)
_CARRY_STATUSES: Final = get_args(CarryStatus)
_MGET_CHUNK: Final = 16  # updates can be megabytes each: fetch them a few at a time


class StoreError(FedMaskError):
    """Redis is unreachable or refused a command, or a round/device rule was broken. `retryable` is True
    when Redis could not be reached (refused or lost connection, timeout, still loading its data after a
    restart): the same call may succeed later, so the service waits instead of failing the delivery."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RoundInfo:
    round_id: int
    state: str
    opened_at: float
    deadline: float
    quorum: int
    sampled: list[str]
    received: list[str]
    late: list[str]
    carried: list[str]
    arrivals: dict[str, float]  # device -> seconds from opening to its update being stored
    closing_at: float | None  # when the closer was elected (quorum met or deadline passed)
    closed_at: float | None  # when every merged mask had been confirmed by the broker
    policy: dict[str, object]

    @property
    def close_seconds(self) -> float | None:
        """Close latency: closer elected -> last merged mask confirmed (None until closed)."""
        if self.closing_at is None or self.closed_at is None:
            return None
        return self.closed_at - self.closing_at


def _num(x: float, what: str) -> str:
    if not math.isfinite(x):
        raise StoreError(f"{what} must be finite, got {x!r}")
    return repr(float(x))


def _s(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RoundStore(DeviceLifecycle, CloseLease, PendingUpdates, BatchIngest):
    wait_replicas = 0  # replicas that must hold an update before ingest_update returns (URL ?replicas=N)

    def __init__(self, client: redis.Redis, prefix: str = "fm:") -> None:
        self.keys = StoreKeys(prefix)  # refuses a prefix with braces
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("RoundStore needs a redis client created with decode_responses=False")
        self.client, self.prefix = client, prefix
        self._scripts = register_scripts(client)

    @classmethod
    def from_url(cls, url: str, prefix: str = "fm:", *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> RoundStore:
        """redis:// or rediss://. rediss:// always verifies the server's certificate chain (against
        ca_file, or the system store when None) and host name; cert_file/key_file are a client
        certificate for servers with tls-auth-clients yes. TLS options are these arguments: the URL's
        query string may not carry ssl_* options (redis-py would let them override, e.g. ssl_cert_reqs=none)."""
        store = cls(client_from_url(url, ca_file=ca_file, cert_file=cert_file, key_file=key_file), prefix)
        store.wait_replicas = replicas_to_wait(url)
        return store

    def close(self) -> None:
        self.client.close()

    # -- plumbing ---------------------------------------------------------------------
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            msg = f"{type(exc).__name__}: {exc}"
            password = self.client.connection_pool.connection_kwargs.get("password")
            if isinstance(password, str) and password:
                msg = msg.replace(password, "***")
            # BusyLoadingError (a restarted Redis reading its AOF) is a ConnectionError; so are wrong
            # credentials, which no wait can fix.
            unreachable = isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and not isinstance(
                exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError))
            raise StoreError(f"redis {what} failed: {msg}", retryable=unreachable) from None

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        with self._guard(name):
            return self._scripts[name](keys=keys, args=args)

    # -- devices ----------------------------------------------------------------------
    def register_device(self, device_id: str, *, profile: str, fingerprint: str, structure: bytes,
                        now: float) -> None:
        """Enrol a device (idempotent). A hello with a different structure raises StoreError."""
        res = _s(self._run("register_device", self.keys.register_device(device_id),
                           [device_id, profile, fingerprint, bytes(structure), _num(now, "now")]))
        if res == "structure_changed":
            raise StoreError(f"device {device_id} said hello with a different structure (a structure never changes)")

    def device_ids(self) -> list[str]:
        with self._guard("device_ids"):
            return sorted(_s(m) for m in cast(set[bytes], self.client.smembers(self.keys.key("devices"))))

    def structure(self, device_id: str) -> bytes | None:
        with self._guard("structure"):
            return cast("bytes | None", self.client.get(self.keys.key("device", device_id, "structure")))

    def touch(self, device_id: str, now: float) -> None:
        """Heartbeat; never moves backwards. Ignored for a device that has not said hello."""
        self._run("touch", self.keys.touch(device_id), [device_id, _num(now, "now")])

    def alive(self, since: float) -> list[str]:
        with self._guard("alive"):
            ids = cast(list[bytes], self.client.zrangebyscore(self.keys.key("devices:alive"), since, "+inf"))
        return sorted(_s(m) for m in ids)

    def mark_tasked(self, device_ids: list[str], round_id: int) -> None:
        """Record that these devices were sent round `round_id`'s task (sampling skips busy devices)."""
        with self._guard("mark_tasked"):
            pipe = self.client.pipeline(transaction=False)
            for d in device_ids:
                pipe.hset(self.keys.key("device", d), "tasked", round_id)
            pipe.execute()

    def mark_reported(self, device_id: str, round_id: int) -> None:
        with self._guard("mark_reported"):
            self.client.hset(self.keys.key("device", device_id), "reported", round_id)

    def busy(self, device_ids: list[str], next_round: int, max_staleness: int) -> set[str]:
        """Devices still training an earlier task that can yet count: tasked in a round within
        `max_staleness` of `next_round` and not answered since. Past the bound a device is presumed
        lost (crashed, offline) and may be sampled again."""
        with self._guard("busy"):
            pipe = self.client.pipeline(transaction=False)
            for d in device_ids:
                pipe.hmget(self.keys.key("device", d), ["tasked", "reported"])
            rows = cast(list[list["bytes | None"]], pipe.execute())
        out = set()
        for d, (tasked, reported) in zip(device_ids, rows, strict=True):
            if tasked is None:
                continue
            t = int(tasked)
            if (reported is None or int(reported) < t) and next_round - t <= max_staleness:
                out.add(d)
        return out

    def mask_version(self, device_id: str) -> int:
        with self._guard("mask_version"):
            raw = self.client.get(self.keys.key("device", device_id, "mask_version"))
        return int(cast(bytes, raw)) if raw is not None else 0

    def set_masks(self, masks: dict[str, bytes], version: int) -> None:
        """Store each device's merged mask, in one round trip (a round's close stores up to K masks); a
        device's mask is written only if `version` is newer than its stored one (a replay is a no-op)."""
        nonce = uuid.uuid4().hex
        with self._guard("set_masks"):
            pipe = self.client.pipeline(transaction=False)
            for device_id, packed in masks.items():
                dk = self.keys.key("device", device_id)
                incoming = f"{dk}:mask_incoming:{nonce}"
                pipe.set(incoming, bytes(packed), px=INCOMING_TTL_MS)
                self._scripts["set_mask"](keys=[dk + ":mask", dk + ":mask_version", dk + ":mask_prev",
                                                dk + ":mask_prev_version", incoming], args=[int(version)],
                                          client=pipe)
            pipe.execute()

    def mask(self, device_id: str) -> tuple[bytes, int] | None:
        dk = self.keys.key("device", device_id)
        with self._guard("mask"):
            packed, version = cast(list["bytes | None"], self.client.mget([dk + ":mask", dk + ":mask_version"]))
        return None if packed is None or version is None else (packed, int(version))

    def held_masks(self, device_id: str) -> dict[int, bytes]:
        """version -> stored mask, for the newest and the one before it (what delta-coded updates are
        decoded against), in one round trip."""
        dk = self.keys.key("device", device_id)
        with self._guard("held_masks"):
            raw = cast(list["bytes | None"], self.client.mget(
                [dk + ":mask", dk + ":mask_version", dk + ":mask_prev", dk + ":mask_prev_version"]))
        held = {int(raw[3]): raw[2]} if raw[2] is not None and raw[3] is not None else {}
        if raw[0] is not None and raw[1] is not None:
            held[int(raw[1])] = raw[0]
        return held

    # -- rounds -----------------------------------------------------------------------
    def open_round(self, round_id: int, *, sampled: list[str], deadline: float, quorum: int, now: float,
                   policy: dict[str, object] | None = None) -> None:
        """Open a round atomically; StoreError unless round_id > current and the current round is closed."""
        ids = sorted(set(sampled))
        if round_id < 0 or not ids or quorum < 1:
            raise StoreError(f"round {round_id}: needs an id >= 0, sampled devices and a quorum >= 1")
        try:
            policy_json = json.dumps(policy or {}, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"round {round_id}: policy is not JSON: {exc}") from None
        args: list[Any] = [round_id, _num(now, "now"), _num(deadline, "deadline"), int(quorum), policy_json, *ids]
        for _ in range(5):  # "stale": another opener moved round:current between our read and the script
            cur = self.current_round()
            keys = [self.keys.key("round:current"), self.keys.key("rounds"), self.keys.in_round(round_id, "round"),
                    self.keys.in_round(round_id, "sampled"),
                    self.keys.in_round(round_id if cur is None else cur, "round")]
            res = _s(self._run("open_round", keys, ["" if cur is None else str(cur), *args]))
            if res == "opened":
                return
            if res == "not_newer":
                raise StoreError(f"cannot open round {round_id}: the current round is {cur}")
            if res.startswith("not_closed:"):
                raise StoreError(f"cannot open round {round_id}: round {cur} is still {res.split(':', 1)[1]}")
            if res == "exists":
                raise StoreError(f"cannot open round {round_id}: it already exists")
        raise StoreError(f"cannot open round {round_id}: round:current keeps changing (concurrent openers)")

    def current_round(self) -> int | None:
        with self._guard("current_round"):
            raw = self.client.get(self.keys.key("round:current"))
        return int(cast(bytes, raw)) if raw is not None else None

    def info(self, round_id: int) -> RoundInfo | None:
        with self._guard("info"):
            pipe = self.client.pipeline(transaction=True)  # one slot: a consistent snapshot
            pipe.hgetall(self.keys.in_round(round_id, "round"))
            for part in ("sampled", "received", "late", "carried"):
                pipe.smembers(self.keys.in_round(round_id, part))
            pipe.hgetall(self.keys.in_round(round_id, "arrivals"))
            raw, *sets, arrivals_raw = pipe.execute()
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in cast(dict[bytes, bytes], raw).items()}
        sampled, received, late, carried = (sorted(_s(m) for m in s) for s in sets)
        opened_at = float(h["opened_at"])
        arrivals = {_s(k): float(v) - opened_at for k, v in cast(dict[bytes, bytes], arrivals_raw).items()}
        return RoundInfo(round_id=round_id, state=h["state"], opened_at=opened_at,
                         deadline=float(h["deadline"]), quorum=int(h["quorum"]), sampled=sampled,
                         received=received, late=late, carried=carried, arrivals=dict(sorted(arrivals.items())),
                         closing_at=float(h["closing_at"]) if "closing_at" in h else None,
                         closed_at=float(h["closed_at"]) if "closed_at" in h else None,
                         policy=cast(dict[str, object], json.loads(h.get("policy", "{}"))))

    def ingest_update(self, round_id: int, device_id: str, body: bytes, now: float) -> tuple[UpdateStatus, bool]:
        """Persist a round's own update at most once, with the device's heartbeat and the closer
        election, in one round trip (the hot path: one call per update). Returns (status, whether this
        call was elected to close); status is "stored", "duplicate", "closed", "not_sampled" or
        "unknown_round" (aggregator/lua/admit_update.lua)."""
        keys = self.keys.admit(round_id, device_id, "received")
        with self._guard("ingest_update"):
            pipe = self.client.pipeline(transaction=False)
            self._scripts["admit_update"](keys=keys, args=[device_id, bytes(body), _num(now, "now"), "store"],
                                          client=pipe)
            self._scripts["touch"](keys=self.keys.touch(device_id),
                                   args=[device_id, _num(now, "now")], client=pipe)
            self._scripts["close_round"](keys=[keys[0], keys[2], self.keys.in_round(round_id, "closer")],
                                         args=[_num(now, "now"), *self.closer_args()], client=pipe)
            if self.wait_replicas:  # the caller acks on return: the update must be on N replicas first
                pipe.execute_command("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS)  # type: ignore[no-untyped-call]
            status_raw, _, elected, *acked = pipe.execute()
        if self.wait_replicas and int(acked[0]) < self.wait_replicas:
            raise StoreError(f"only {acked[0]} of {self.wait_replicas} Redis replicas confirmed the update of "
                             f"{device_id} within {WAIT_TIMEOUT_MS} ms; it is not acknowledged", retryable=True)
        status = _s(status_raw)
        if status not in _UPDATE_STATUSES:
            raise StoreError(f"admit_update returned {status!r}")
        return cast(UpdateStatus, status), int(elected) == 1

    def note_update(self, device_id: str, round_id: int, counter: str, stats: dict[str, float] | None = None) -> None:
        """mark_reported and incr(counter) in one round trip; with `stats` (the update's training
        statistics, checked by the codec) also the device's row of the round's stats hash."""
        with self._guard("note_update"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.keys.key("device", device_id), "reported", round_id)
            pipe.hincrby(self.keys.key("counters"), counter, 1)
            if stats:
                pipe.hset(self.keys.in_round(round_id, "stats"), device_id, json.dumps(stats, sort_keys=True))
            pipe.execute()

    def carry_update(self, round_id: int, device_id: str, body: bytes, now: float) -> CarryStatus:
        """Merge a late update of an earlier round into open round `round_id` (at most once)."""
        keys = self.keys.admit(round_id, device_id, "carried")
        res = _s(self._run("admit_update", keys, [device_id, bytes(body), _num(now, "now"), "carry"]))
        if res not in _CARRY_STATUSES:
            raise StoreError(f"admit_update returned {res!r}")
        return cast(CarryStatus, res)

    def mark_late(self, round_id: int, device_id: str) -> None:
        with self._guard("mark_late"):
            self.client.sadd(self.keys.in_round(round_id, "late"), device_id)

    def try_close(self, round_id: int, now: float) -> bool:
        """open -> closing if the quorum is met or the deadline passed; True for exactly one caller."""
        keys = [self.keys.in_round(round_id, "round"), self.keys.in_round(round_id, "received"),
                self.keys.in_round(round_id, "closer")]
        return int(self._run("close_round", keys, [_num(now, "now"), *self.closer_args()])) == 1

    def updates(self, round_id: int) -> dict[str, bytes]:
        """device -> stored update body, for every received and carried device (bodies are written
        before the SADD, so a member without a body means the store was tampered with)."""
        with self._guard("updates"):
            members = self.client.sunion([self.keys.in_round(round_id, "received"),
                                          self.keys.in_round(round_id, "carried")])
            devices = sorted(_s(m) for m in cast(set[bytes], members))
            out: dict[str, bytes] = {}
            for i in range(0, len(devices), _MGET_CHUNK):
                chunk = devices[i:i + _MGET_CHUNK]
                bodies = cast(list["bytes | None"],
                              self.client.mget([self.keys.in_round(round_id, "update", d) for d in chunk]))
                for d, body in zip(chunk, bodies, strict=True):
                    if body is None:
                        raise StoreError(f"round {round_id}: {d} is received but its update is missing")
                    out[d] = body
        return out

    def mark_closed(self, round_id: int, now: float) -> bool:
        """closing -> closed; True for the call that closed it (calling it again changes nothing: False),
        so two closers racing after an outage count the round once."""
        res = _s(self._run("mark_closed", [self.keys.in_round(round_id, "round")], [_num(now, "now")]))
        if res not in ("closed", "already"):
            raise StoreError(f"cannot mark round {round_id} closed: it is {res.replace('_', ' ')}")
        return res == "closed"

    def rounds_in_state(self, state: str) -> list[int]:
        """Round ids (ascending) in `state`, found through the <p>rounds zset."""
        if state not in STATES:
            raise StoreError(f"unknown round state {state!r} (one of {', '.join(STATES)})")
        with self._guard("rounds_in_state"):
            ids = [int(m) for m in cast(list[bytes], self.client.zrange(self.keys.key("rounds"), 0, -1))]
            pipe = self.client.pipeline(transaction=False)
            for r in ids:
                pipe.hget(self.keys.in_round(r, "round"), "state")
            states = cast(list["bytes | None"], pipe.execute())
        return [r for r, s in zip(ids, states, strict=True) if s is not None and _s(s) == state]

    # -- the aggregator's model, so operator commands open rounds for the same model ----
    def set_config(self, config: dict[str, str]) -> None:
        with self._guard("set_config"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.keys.key("config"))
            pipe.hset(self.keys.key("config"), mapping=config)  # type: ignore[arg-type]
            pipe.execute()

    def config(self) -> dict[str, str]:
        with self._guard("config"):
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.key("config")))
        return {_s(k): _s(v) for k, v in raw.items()}

    # -- counters and health ----------------------------------------------------------
    def incr(self, counter: str, by: int = 1) -> None:
        with self._guard("incr"):
            self.client.hincrby(self.keys.key("counters"), counter, by)

    def counters(self) -> dict[str, int]:
        with self._guard("counters"):
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.key("counters")))
        return {_s(k): int(v) for k, v in sorted(raw.items())}

    def ping(self) -> None:
        with self._guard("ping"):
            self.client.ping()

    def ack_durability(self) -> AckDurability:
        """Whether the server makes an answered write durable (aggregator/store_durability.py)."""
        with self._guard("ack_durability"):
            return read_ack_durability(self.client, self.wait_replicas)
