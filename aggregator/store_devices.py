"""The device lifecycle half of RoundStore: boards that cannot be reached, and boards removed for good.

Keys (prefix <p>, beside those in store_keys.py):
  <p>devices:unreachable   set   boards whose queue refused a downlink (unroutable): not sampled until
                                 they say hello again; their newest mask waits in <p>device:<id>:mask
  <p>devices:removed       set   boards removed by an operator: every message from them is refused,
                                 and a hello does not bring them back (only a new enrolment does)

A board removed mid-round loses the update it stored in that round if the round is still open (the
round then closes on the updates of the others); a round already closing merges it, and its merged
mask then goes nowhere (the board's queue is gone), which the close survives as for any unreachable
board. A close resumed by a process that never cached the board's structure (a restart, a take-over)
cannot merge it and leaves it out (aggregator/core.py close). In async mode the stream's keys are
left to the aggregator: its next flush reads the removed set, drops the board's buffered update and
forgets its latest (aggregator/core_async.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import cast

import redis

from aggregator.store_keys import StoreKeys


def _s(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class DeviceLifecycle:
    """Mixed into RoundStore (which provides the client, the key names and the error guard)."""

    client: redis.Redis
    keys: StoreKeys
    _guard: Callable[[str], AbstractContextManager[None]]

    # -- unreachable ---------------------------------------------------------------------
    def mark_unreachable(self, device_id: str, now: float) -> bool:
        """True if the board was reachable until now (so the caller counts it once)."""
        with self._guard("mark_unreachable"):
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(self.keys.key("devices:unreachable"), device_id)
            pipe.hset(self.keys.key("device", device_id), "unreachable_at", repr(float(now)))
            added, _ = pipe.execute()
        return bool(added)

    def clear_unreachable(self, device_id: str) -> bool:
        """True if the board had been unreachable (its newest mask is then owed to it)."""
        with self._guard("clear_unreachable"):
            pipe = self.client.pipeline(transaction=True)
            pipe.srem(self.keys.key("devices:unreachable"), device_id)
            pipe.hdel(self.keys.key("device", device_id), "unreachable_at")
            removed, _ = pipe.execute()
        return bool(removed)

    def unreachable(self) -> set[str]:
        with self._guard("unreachable"):
            return {_s(m) for m in cast(set[bytes], self.client.smembers(self.keys.key("devices:unreachable")))}

    def unreachable_count(self) -> int:
        with self._guard("unreachable_count"):
            return int(self.client.scard(self.keys.key("devices:unreachable")))

    # -- removed -------------------------------------------------------------------------
    def is_removed(self, device_id: str) -> bool:
        with self._guard("is_removed"):
            return bool(self.client.sismember(self.keys.key("devices:removed"), device_id))

    def removed(self) -> set[str]:
        with self._guard("removed"):
            return {_s(m) for m in cast(set[bytes], self.client.smembers(self.keys.key("devices:removed")))}

    def remove_device(self, device_id: str, open_round: int | None) -> dict[str, int]:
        """Forget a board: out of the enrolled, alive and unreachable sets, its structure, mask and
        parked late update deleted, its update in `open_round` (if that round is still open) taken
        out of it. Returns what was resolved: {"parked": 0|1, "stored": 0|1}. Idempotent."""
        dk = self.keys.key("device", device_id)
        with self._guard("remove_device"):
            stored = 0
            if open_round is not None:
                stored = self._drop_open_update(open_round, device_id)
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(self.keys.key("devices:removed"), device_id)
            pipe.srem(self.keys.key("devices"), device_id)
            pipe.zrem(self.keys.key("devices:alive"), device_id)
            pipe.srem(self.keys.key("devices:unreachable"), device_id)
            pipe.srem(self.keys.key("pending"), device_id)
            pipe.delete(self.keys.key("pending", device_id))
            pipe.delete(dk, dk + ":structure", dk + ":mask", dk + ":mask_version", dk + ":mask_prev",
                        dk + ":mask_prev_version")
            _, _, _, _, _, parked, _ = pipe.execute()
        return {"parked": int(parked), "stored": stored}

    def _drop_open_update(self, round_id: int, device_id: str) -> int:
        """Take the board's stored update out of an open round, atomically with a check that the round
        is still open (WATCH: a closer elected meanwhile keeps it, and merges it)."""
        round_key = self.keys.in_round(round_id, "round")
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(round_key)  # type: ignore[no-untyped-call]
                    if _s(pipe.hget(round_key, "state") or b"") != "open":
                        pipe.reset()
                        return 0
                    pipe.multi()
                    pipe.srem(self.keys.in_round(round_id, "received"), device_id)
                    pipe.srem(self.keys.in_round(round_id, "carried"), device_id)
                    pipe.delete(self.keys.in_round(round_id, "update", device_id))
                    pipe.hdel(self.keys.in_round(round_id, "arrivals"), device_id)
                    pipe.hdel(self.keys.in_round(round_id, "stats"), device_id)  # not in the round's means
                    received, carried, *_ = pipe.execute()
                    return int(bool(received or carried))
                except redis.WatchError:
                    continue

    def readmit(self, device_id: str) -> None:
        """A new enrolment of a removed id (new hardware, or a mistaken removal): it may say hello again,
        with a structure of its own."""
        with self._guard("readmit"):
            self.client.srem(self.keys.key("devices:removed"), device_id)
