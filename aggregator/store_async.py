"""The asynchronous stream's state in Redis (`--mode async`, issue 13): all its Redis access.

Key layout (under the RoundStore's prefix <p>; hash tag {async} keeps them in one cluster slot):
  <p>{async}:state     hash    version (merged-mask counter), pending (stored since the last flush),
                               stored, replaced, duplicate, merged, dropped_removed, flushes, refused_delta
                               (counters)
  <p>{async}:done      hash    device -> the highest task number stored: a redelivery (task <= it) is
                               a no-op (votes are not idempotent, so the id is checked, not the payload)
  <p>{async}:latest    hash    device -> its latest raw encoded update
  <p>{async}:base      hash    device -> the merged-mask version that update trained from
  <p>{async}:buffer    list    devices with a buffered update, in arrival order
  <p>{async}:order     list    the last `replay_keep` update ids, in the order they were stored
  <p>{async}:log       hash    update id -> raw update, for those ids (the replay's input)
  <p>{async}:flushes   list    json per committed flush (the last `flush_keep`): version, devices (merged),
                               voters, removed (boards forgotten: `fedmask devices remove`), dropped
                               (those of them whose buffered update was not merged)
Every key is bounded, so a stream can run for months: by the fleet (done, latest, base, buffer) or by a
setting (order and log: `--replay-keep` updates, default REPLAY_KEEP; flushes: FLUSH_KEEP records). A
replay from the stream's start (tests/integration/test_pipeline_async.py) needs the whole order, so
it holds only while the stream has stored at most replay_keep updates.
Storing is one script (async_store.lua), so an update is persisted, buffered and counted in one step
before its ack; a flush is committed by another (async_flush.lua) after its masks were published.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Final, cast

from aggregator.store import RoundStore

# The replay log's bound in updates: at 1M parameters an update is ~100 kB, so ~100 MB of Redis.
REPLAY_KEEP: Final = 1000
FLUSH_KEEP: Final = 100_000  # flush records (a few hundred bytes each)

_SCRIPTS = {name: files("aggregator").joinpath(f"lua/{name}.lua").read_text("utf-8")
            for name in ("async_store", "async_flush")}


@dataclass(frozen=True)
class AsyncState:
    version: int
    buffer: list[str]
    latest: dict[str, bytes]
    base: dict[str, int]
    counts: dict[str, int]


def update_id(device: str, task: int) -> str:
    return f"{device}:{task}"


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class AsyncStore:
    def __init__(self, store: RoundStore, *, replay_keep: int = REPLAY_KEEP, flush_keep: int = FLUSH_KEEP) -> None:
        if replay_keep < 0 or flush_keep < 1:
            raise ValueError(f"replay_keep must be >= 0 and flush_keep >= 1, got {replay_keep}, {flush_keep}")
        self.store = store
        self.client = store.client
        self.replay_keep, self.flush_keep = replay_keep, flush_keep
        p = store.prefix + "{async}:"
        self.k = {n: p + n for n in ("state", "done", "latest", "base", "buffer", "order", "log", "flushes")}
        self._scripts = {n: self.client.register_script(src) for n, src in _SCRIPTS.items()}

    def put(self, device: str, task: int, body: bytes, base: int) -> tuple[str, int]:
        """Store `device`'s update for task number `task`: (stored | replaced | duplicate | future_base,
        pending count). Its id in the replay log is update_id(device, task)."""
        k = self.k
        with self.store._guard("async_store"):
            status, pending = self._scripts["async_store"](
                keys=[k["done"], k["latest"], k["base"], k["buffer"], k["state"], k["order"], k["log"]],
                args=[device, update_id(device, task), body, base, task, self.replay_keep])
        return _s(status), int(pending)

    def done_task(self, device: str) -> int:
        """The highest task number stored for `device` (0: none)."""
        with self.store._guard("async_done"):
            top = self.client.hget(self.k["done"], device)
        return int(top) if top is not None else 0

    def incr(self, name: str) -> None:
        with self.store._guard("async_incr"):
            self.client.hincrby(self.k["state"], name, 1)

    def state(self) -> AsyncState:
        k = self.k
        with self.store._guard("async_state"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(k["state"])
            pipe.lrange(k["buffer"], 0, -1)
            pipe.hgetall(k["latest"])
            pipe.hgetall(k["base"])
            st, buf, latest, base = pipe.execute()
        counts = {_s(a): int(b) for a, b in cast(dict[bytes, bytes], st).items()}
        return AsyncState(counts.get("version", 0), [_s(d) for d in buf],
                          {_s(a): bytes(b) for a, b in latest.items()}, {_s(a): int(b) for a, b in base.items()},
                          counts)

    def commit_flush(self, version: int, devices: Sequence[str], voters: int, removed: Sequence[str] = (),
                     dropped: Sequence[str] = ()) -> bool:
        """Commit the flush from `version` that merged `devices`; the `removed` boards' latest updates
        are forgotten, and `dropped` (those of them still buffered) counted dropped_removed."""
        record = json.dumps({"version": version + 1, "devices": list(devices), "voters": voters,
                             "removed": list(removed), "dropped": list(dropped)})
        k = self.k
        with self.store._guard("async_flush"):
            done = self._scripts["async_flush"](keys=[k["state"], k["buffer"], k["flushes"], k["latest"], k["base"]],
                                                args=[version, len(devices), record, self.flush_keep, len(dropped),
                                                      *removed])
        return bool(done)

    def order(self) -> list[tuple[str, bytes]]:
        """(update id, raw update) in stored order, the last replay_keep of them: the replay's input."""
        with self.store._guard("async_order"):
            ids = [_s(i) for i in self.client.lrange(self.k["order"], 0, -1)]
            bodies = cast(list["bytes | None"], self.client.hmget(self.k["log"], ids)) if ids else []
        return [(i, b) for i, b in zip(ids, bodies, strict=True) if b is not None]

    def flushes(self) -> list[dict[str, object]]:
        with self.store._guard("async_flushes"):
            return [json.loads(r) for r in self.client.lrange(self.k["flushes"], 0, -1)]
