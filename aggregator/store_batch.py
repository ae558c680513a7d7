"""The batch half of RoundStore: a prefetch window of updates persisted in one Redis round trip.

One pipeline carries, per update and in delivery order, a SET of its body under a key of its own,
admit_update.lua in mode "ingest" (refuse a removed board, store at most once by renaming that key,
mark it reported, count it, keep its stats), touch.lua (heartbeat) and close_round.lua (the closer
election); then the batch's rejection counters, then one WAIT for the replicas when the URL asks for
them. Per update the order is the single-update path's, so a batch
elects the same closer a one-by-one ingest would: the update that meets the quorum is elected, and
the updates after it in the batch find the round closing (late), exactly as they would have.

Durability for the batch: every write of the pipeline is answered after it is in the AOF (appendfsync
always: Redis fsyncs before it replies to the commands of an event loop pass, so a batch costs one
fsync, not one per update), and WAIT, sent after the last write, returns only once the replicas hold
every write before it. Nothing is returned (so nothing is acked) before execute() has the answers.

Failure: a connection lost mid-pipeline raises StoreError(retryable) for the whole batch: some of its
updates may be stored, none is acked, and the retry finds those as duplicates (acked then). A command
Redis refuses fails its own update only (BatchResult.error), never its neighbours.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, cast

import redis
from redis.commands.core import Script

from aggregator.store_keys import StoreKeys

INGEST_STATUSES: Final = ("stored", "duplicate", "closed", "not_sampled", "unknown_round", "removed")
WAIT_TIMEOUT_MS: Final = 5000
# An incoming body outlives its pipeline only if the connection drops between its SET and its script.
INCOMING_TTL_MS: Final = 600_000


@dataclass(frozen=True)
class BatchUpdate:
    round_id: int
    device: str
    body: bytes  # as Redis keeps it (a delta-coded update already decoded)
    stats_json: str = ""  # the checked training statistics, or "" (aggregator/round_stats.py)


@dataclass(frozen=True)
class BatchResult:
    status: str = ""  # one of INGEST_STATUSES when error is empty
    elected: bool = False  # this update's close_round elected this process to close its round
    error: str = ""  # Redis refused this update's commands (the others are unaffected)


class BatchIngest:
    """Mixed into RoundStore (aggregator/store.py), which provides these."""

    client: redis.Redis
    keys: StoreKeys
    wait_replicas: int
    _scripts: dict[str, Script]

    _guard: Callable[[str], AbstractContextManager[None]]
    closer_args: Callable[[], list[str | int]]  # aggregator/store_closer.py

    def ingest_batch(self, updates: Sequence[BatchUpdate], now: float,
                     counters: dict[str, int] | None = None) -> list[BatchResult]:
        """Persist `updates` (see the module docstring); `counters` (e.g. the batch's rejections) are
        added in the same round trip. One BatchResult per update, in order."""
        if not updates and not counters:
            return []
        with self._guard("ingest_batch"):
            replies = self._ingest_pipeline(updates, repr(float(now)), counters or {})
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                # A restarted or flushed Redis lost the scripts: load them, send the batch again (every
                # command of it is idempotent, and the refused scripts did nothing).
                for script in self._scripts.values():
                    script.sha = self.client.script_load(script.script)
                replies = self._ingest_pipeline(updates, repr(float(now)), counters or {})
        # A lost connection raises above; what is in `replies` are per-command answers or refusals.
        if self.wait_replicas and updates:
            acked = replies[-1]
            if isinstance(acked, Exception) or int(acked) < self.wait_replicas:
                from aggregator.store import StoreError  # store.py imports this module
                raise StoreError(f"only {acked} of {self.wait_replicas} Redis replicas confirmed a batch of "
                                 f"{len(updates)} updates within {WAIT_TIMEOUT_MS} ms; none is acknowledged",
                                 retryable=True)
        return list(_results(replies, len(updates)))

    def _ingest_pipeline(self, updates: Sequence[BatchUpdate], t: str, counters: dict[str, int]) -> list[Any]:
        """One pipeline for the batch. EVALSHA directly: a redis-py Script in a pipeline first asks
        SCRIPT EXISTS, one more round trip per batch; a missing script is handled by the caller."""
        pipe = self.client.pipeline(transaction=False)
        admit, touch, close = (self._scripts[n].sha for n in ("admit_update", "touch", "close_round"))
        closer = self.closer_args()
        nonce = uuid.uuid4().hex  # incoming keys are this call's own: no other caller can rename them
        for i, u in enumerate(updates):
            incoming = self.keys.in_round(u.round_id, "incoming", u.device, f"{nonce}{i}")
            pipe.set(incoming, bytes(u.body), px=INCOMING_TTL_MS)
            keys = [*self._ingest_keys(u), incoming]
            pipe.evalsha(admit, len(keys), *keys, u.device, "", t, "ingest", u.round_id, u.stats_json)
            pipe.evalsha(touch, 3, *self.keys.touch(u.device), u.device, t)
            pipe.evalsha(close, 3, self.keys.in_round(u.round_id, "round"), self.keys.in_round(u.round_id, "received"),
                         self.keys.in_round(u.round_id, "closer"), t, *closer)
        for name, by in sorted(counters.items()):
            pipe.hincrby(self.keys.key("counters"), name, by)
        if self.wait_replicas and updates:  # after every write: it covers them all
            pipe.execute_command("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS)  # type: ignore[no-untyped-call]
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies

    def structures(self, device_ids: Sequence[str]) -> dict[str, bytes | None]:
        """device -> its packed structure (None: never said hello), in one round trip."""
        with self._guard("structures"):
            keys = [self.keys.key("device", d, "structure") for d in device_ids]
            raw = cast(list["bytes | None"], self.client.mget(keys))
        return dict(zip(device_ids, raw, strict=True))

    def _ingest_keys(self, u: BatchUpdate) -> list[str]:
        device = self.keys.key("device", u.device)
        return [*self.keys.admit(u.round_id, u.device, "received"), self.keys.key("devices:removed"), device,
                self.keys.key("counters"), self.keys.in_round(u.round_id, "stats")]


def _results(replies: list[Any], n: int) -> Iterator[BatchResult]:
    for i in range(n):
        put, status, _touched, elected = replies[4 * i: 4 * i + 4]
        if isinstance(put, Exception):
            status = put
        if isinstance(status, Exception):
            yield BatchResult(error=f"admit_update: {type(status).__name__}: {status}")
            continue
        text = status.decode() if isinstance(status, bytes) else str(status)
        if text not in INGEST_STATUSES:
            yield BatchResult(error=f"admit_update returned {text!r}")
            continue
        # A refused election (an error) is not fatal to the update: it is stored, and the ticker's
        # own election closes the round at its deadline or on the next quorum-meeting call.
        yield BatchResult(status=text, elected=not isinstance(elected, Exception) and int(elected) == 1)

