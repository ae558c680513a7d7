"""The close lease: several aggregators share one uplink queue, and exactly one closes each round.

The election (close_round.lua) moves a round open -> closing and, in the same step, writes
<p>{r<r>}:closer = the winner's id with an expiry (the lease). The winner renews it while it publishes.
If the winner dies mid-close, the round stays "closing" and its lease lapses; the next tick of any
other aggregator claims the lease (SET NX) and finishes the close, which is idempotent (masks carry the
round as version; Redis keeps only a newer one; devices drop a repeat). While the lease is held nobody
else closes, so a slow closer is not doubled; a closer stalled past its lease may be, harmlessly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import cast

import redis

from aggregator.store_keys import StoreKeys

DEFAULT_LEASE_S = 30.0  # a close of 1,000 devices takes ~2 s here; renewed during long closes


def default_closer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def closer_is_dead_here(closer_id: str) -> bool:
    """A closer id names a process of this host that is no longer running."""
    host, _, pid = closer_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class CloseLease:
    """Mixed into RoundStore (which provides the client, the key names and the error guard)."""

    client: redis.Redis
    keys: StoreKeys
    _guard: Callable[[str], AbstractContextManager[None]]
    closer_id: str = ""
    lease_ms: int = int(DEFAULT_LEASE_S * 1000)

    def set_closer(self, closer_id: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        """Who this process is when it wins an election, and how long its lease lasts."""
        if lease_s <= 0:
            raise ValueError(f"the close lease must be positive, got {lease_s}")
        self.closer_id, self.lease_ms = closer_id, int(lease_s * 1000)

    def _closer_id(self) -> str:
        return self.closer_id or default_closer_id()

    def closer_args(self) -> list[str | int]:
        """close_round.lua's ARGV[2:]: this process's id and its lease."""
        return [self._closer_id(), self.lease_ms]

    def claim_close(self, round_id: int) -> bool:
        """Take over a round whose closer's lease has lapsed; True if this process now holds it."""
        with self._guard("claim_close"):
            return bool(self.client.set(self.keys.in_round(round_id, "closer"), self._closer_id(), nx=True,
                                        px=self.lease_ms))

    def renew_close(self, round_id: int) -> None:
        """Extend this process's lease during a long close (it is the closer: plain SET)."""
        with self._guard("renew_close"):
            self.client.set(self.keys.in_round(round_id, "closer"), self._closer_id(), px=self.lease_ms)

    def closer_of(self, round_id: int) -> str | None:
        with self._guard("closer_of"):
            raw = cast("bytes | None", self.client.get(self.keys.in_round(round_id, "closer")))
        return raw.decode() if raw is not None else None
