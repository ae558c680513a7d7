"""Where RoundStore keeps things in Redis: the key names and the Lua scripts that change them.

Key layout (prefix <p>, default "fm:"):
  <p>device:<id>               hash    profile, fingerprint, enrolled_at, last_seen,
                                       tasked (last round it was sent), reported (last round it answered)
  <p>device:<id>:structure     string  packed structure S_i (written once; never changes)
  <p>device:<id>:mask          string  its last downlink payload: packed full merged mask, or q4 levels (agreement)
  <p>device:<id>:mask_version  int     its version (only ever increases)
  <p>device:<id>:mask_prev / :mask_prev_version   the mask (and version) the newest one replaced:
                                       a delta-coded update may be coded against it (a redelivery)
  <p>devices                   set     enrolled ids
  <p>devices:alive             zset    id -> last heartbeat (unix seconds)
  <p>round:current             string  newest round id
  <p>rounds                    zset    every round id ever opened (score = id): rounds_in_state walks it
  <p>{r<r>}:round              hash    state (open|closing|closed), opened_at, deadline, quorum,
                                       sampled_count, policy (json), closing_at, closed_at
  <p>{r<r>}:sampled / :received / :late / :carried   sets of device ids (carried: late updates
                                       of earlier rounds merged into this one; not in the quorum)
  <p>{r<r>}:arrivals           hash    id -> unix time its update was stored
  <p>{r<r>}:closer            string  the closer's id, with an expiry (the close lease: store_closer.py)
  <p>{r<r>}:update:<id>        string  the raw encoded update (SET NX: a redelivery is a no-op)
  <p>{r<r>}:stats              hash    id -> json of its stored update's stats (loss, accuracy, val_accuracy,
                                       samples, train_seconds): aggregator/round_stats.py reads it
  <p>devices:unreachable / :removed   sets (aggregator/store_devices.py)
  <p>pending:<id>              hash    round, body: a late update waiting for the next round (carry policy)
  <p>pending                   set     devices with a pending late update (both moved by Lua scripts
                                       only: aggregator/store_pending.py)
  <p>config                    hash    the running aggregator's task, width, seed, merge, fingerprint
  <p>counters                  hash    name -> int; the store itself counts nothing, callers do

A round's keys share the hash tag {r<r>}, so admit_update and close_round (the hot, contended
scripts) run unchanged on Redis Cluster. open_round spans slots (round:current and two rounds).
Every script in lua/ names its KEYS and ARGV in a header; each is registered once per store
(EVALSHA, with redis-py reloading it after a SCRIPT FLUSH or a restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Final

import redis
from redis.commands.core import Script

from shared.errors import ConfigError

SCRIPT_NAMES: Final = ("open_round", "admit_update", "close_round", "mark_closed", "set_mask",
                       "register_device", "touch", "park_update", "carry_pending")
_SOURCES: Final = {name: files("aggregator").joinpath(f"lua/{name}.lua").read_text("utf-8")
                   for name in SCRIPT_NAMES}


def register_scripts(client: redis.Redis) -> dict[str, Script]:
    """Every script in lua/, by name, registered on `client`."""
    return {name: client.register_script(source) for name, source in _SOURCES.items()}


@dataclass(frozen=True)
class StoreKeys:
    """The key names under one prefix (see the module docstring for what each holds)."""

    prefix: str

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigError(f"redis prefix {self.prefix!r} must not contain braces (they mark the round hash tag)")

    def key(self, *parts: str) -> str:
        """<p>part:part:..."""
        return self.prefix + ":".join(parts)

    def in_round(self, round_id: int, *parts: str) -> str:
        """<p>{r<round_id>}:part:... (the round's hash tag keeps its keys in one cluster slot)."""
        return f"{self.prefix}{{r{round_id}}}:" + ":".join(parts)

    def register_device(self, device_id: str) -> list[str]:
        """register_device.lua's KEYS: the device hash, its structure, the enrolled set, the heartbeat zset."""
        device = self.key("device", device_id)
        return [device, device + ":structure", self.key("devices"), self.key("devices:alive")]

    def touch(self, device_id: str) -> list[str]:
        """touch.lua's KEYS: the device hash, the enrolled set, the heartbeat zset."""
        return [self.key("device", device_id), self.key("devices"), self.key("devices:alive")]

    def admit(self, round_id: int, device_id: str, joins: str) -> list[str]:
        """admit_update.lua's KEYS: round, sampled, the set the device joins (received or carried),
        its update, arrivals."""
        return [self.in_round(round_id, "round"), self.in_round(round_id, "sampled"), self.in_round(round_id, joins),
                self.in_round(round_id, "update", device_id), self.in_round(round_id, "arrivals")]
