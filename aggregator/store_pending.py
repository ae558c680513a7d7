"""The parked-late-update half of RoundStore (the "carry" late-update policy).

Keys (prefix <p>, listed with the others in store_keys.py):
  <p>pending:<id>   hash   round, body: a device's newest late update, waiting for the next round
  <p>pending        set    devices with a parked update

Both moves are one Lua script each, so no crash can lose or double a parked update: parking
(lua/park_update.lua) keeps a device's newest late update and says what it did to an older one,
and carrying (lua/carry_pending.lua) merges the parked update into the open round and un-parks it
in the same step. Before, the update was deleted and only then carried: a crash in between lost it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final, Literal, cast, get_args

import redis

from aggregator.store_keys import StoreKeys

ParkStatus = Literal["parked", "replaced", "duplicate", "superseded"]
ParkedCarryStatus = Literal["none", "stale", "carried", "duplicate", "sampled", "closed", "unknown_round"]
_PARK_STATUSES: Final = get_args(ParkStatus)
_PARKED_CARRY_STATUSES: Final = get_args(ParkedCarryStatus)


def _s(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _store_error(message: str) -> Exception:
    from aggregator.store import StoreError  # store.py imports this module

    return StoreError(message)


class PendingUpdates:
    """Mixed into RoundStore (which provides the client, the key names, the scripts and the guard)."""

    client: redis.Redis
    keys: StoreKeys
    _guard: Callable[[str], AbstractContextManager[None]]
    _run: Callable[[str, list[str], list[Any]], Any]

    def set_pending(self, device_id: str, round_id: int, body: bytes) -> ParkStatus:
        """Park a late update until the next round opens. A device keeps only its newest one:
        "replaced" means an older parked update was dropped for this one, "superseded" that this one
        is older than the parked one and was not kept, "duplicate" that it is parked already."""
        keys = [self.keys.key("pending", device_id), self.keys.key("pending")]
        status = _s(self._run("park_update", keys, [device_id, int(round_id), bytes(body)]))
        if status not in _PARK_STATUSES:
            raise _store_error(f"park_update returned {status!r}")
        return cast(ParkStatus, status)

    def pending_devices(self) -> set[str]:
        with self._guard("pending_devices"):
            return {_s(m) for m in cast(set[bytes], self.client.smembers(self.keys.key("pending")))}

    def pending(self) -> list[tuple[str, int, bytes]]:
        """Every parked late update as (device, round, body), sorted by device; nothing is removed."""
        devices = sorted(self.pending_devices())
        with self._guard("pending"):
            pipe = self.client.pipeline(transaction=True)
            for d in devices:
                pipe.hmget(self.keys.key("pending", d), ["round", "body"])
            rows = cast(list[list["bytes | None"]], pipe.execute())
        return [(d, int(r), bytes(b)) for d, (r, b) in zip(devices, rows, strict=True)
                if r is not None and b is not None]

    def carry_pending(self, round_id: int, device_id: str, max_staleness: int,
                      now: float) -> tuple[ParkedCarryStatus, int]:
        """Move the device's parked update into open round `round_id` in one step (see
        lua/carry_pending.lua): returns (status, the parked update's round, -1 for "none")."""
        keys = [self.keys.key("pending", device_id), self.keys.key("pending"),
                *self.keys.admit(round_id, device_id, "carried")]
        status_raw, late_round = self._run("carry_pending", keys,
                                           [device_id, int(round_id), int(max_staleness), repr(float(now))])
        status = _s(status_raw)
        if status not in _PARKED_CARRY_STATUSES:
            raise _store_error(f"carry_pending returned {status!r}")
        return cast(ParkedCarryStatus, status), int(_s(late_round))
