"""Whether an update Redis has stored survives a crash of Redis: checked once, before the first ack.

The aggregator acks an update to RabbitMQ once Redis has stored it, and RabbitMQ then forgets it: from
that moment Redis alone holds it. With `appendfsync everysec` Redis answers before its append-only
file reaches the disk, so a crash of Redis (SIGKILL, OOM kill, power cut) loses up to about a second
of acknowledged updates. With `appendfsync always` Redis fsyncs the AOF before it answers each write,
so an answered write survives. Redis 7.0 (this deployment's) has no WAITAOF (7.2) to ask for that per
write. So an acknowledged update is durable in one of two ways:
  - the server's own setting, appendonly yes and appendfsync always (broker_config/redis.conf ships
    them; the cost is measured by `fedmask bench pipeline --durability both`, docs/results.md);
  - replicas: a Redis URL with `?replicas=N` (N >= 1) makes every stored update wait (WAIT) until N
    replicas hold it before it is acked (aggregator/redis_url.py), so it survives the master's crash
    whatever the master's appendfsync.

Modes (`fedmask aggregator run --ack-durability`, env FEDMASK_ACK_DURABILITY):
  fsync      (default) the server must say appendonly yes and appendfsync always, or the URL must ask
             for replicas (?replicas=N), or the aggregator refuses to start. A user whose ACL refuses
             CONFIG GET (the shipped fedmask-aggregator user: CONFIG GET can read secrets) cannot see
             the setting: the aggregator then starts, says so in its log, and relies on the
             deployment's redis.conf.
  unchecked  the operator accepts the risk (a Redis that is not theirs to configure, a development
             machine): the aggregator starts and logs what a crash of that Redis would lose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, cast

import redis

from shared.errors import ConfigError

log = logging.getLogger("fedmask.aggregator")
ACK_DURABILITY_MODES: Final = ("fsync", "unchecked")


@dataclass(frozen=True)
class AckDurability:
    verdict: str  # "durable" | "not_durable" | "unverified"
    appendonly: str | None  # None when the server would not say (ACL)
    appendfsync: str | None
    replicas: int = 0  # replicas every stored update waits for (?replicas=N)

    def describe(self) -> str:
        if self.replicas:
            return (f"durable (every update acked once {self.replicas} replica(s) hold it; "
                    f"appendfsync {self.appendfsync or 'not readable'})")
        if self.verdict == "unverified":
            return "unverified (this Redis user may not run CONFIG GET)"
        return f"{self.verdict} (appendonly {self.appendonly}, appendfsync {self.appendfsync})"


def read_ack_durability(client: redis.Redis, replicas: int = 0) -> AckDurability:
    """What the server's configuration (and the replicas every update waits for) promise for a write
    it has answered."""
    try:
        raw = cast(dict[object, object], client.config_get("append*"))
    except redis.exceptions.NoPermissionError:
        return AckDurability("durable" if replicas else "unverified", None, None, replicas)
    conf = {_s(k): _s(v) for k, v in raw.items()}
    appendonly, appendfsync = conf.get("appendonly", "no"), conf.get("appendfsync", "everysec")
    durable = replicas >= 1 or (appendonly == "yes" and appendfsync == "always")
    return AckDurability("durable" if durable else "not_durable", appendonly, appendfsync, replicas)


def require_ack_durability(found: AckDurability, mode: str, where: str) -> None:
    """Refuse (ConfigError) or warn as `mode` says; see the module docstring."""
    if mode not in ACK_DURABILITY_MODES:
        raise ConfigError(f"ack durability must be one of {', '.join(ACK_DURABILITY_MODES)}, got {mode!r}")
    if found.verdict == "durable":
        log.info("redis %s makes every stored update durable before it is acked (%s)", where, found.describe())
        return
    if found.verdict == "unverified":
        log.warning("redis %s: cannot read appendonly/appendfsync as this user (its ACL refuses CONFIG GET); "
                    "acked updates survive a crash of Redis only if its redis.conf has appendonly yes and "
                    "appendfsync always, as broker_config/redis.conf does", where)
        return
    risk = (f"redis {where} has appendonly {found.appendonly}, appendfsync {found.appendfsync}: an update is "
            "acked before it reaches the disk, so a crash of Redis loses the updates of the last "
            + ("second" if found.appendonly == "yes" else "snapshot interval"))
    if mode == "unchecked":
        log.warning("%s (accepted: --ack-durability unchecked)", risk)
        return
    raise ConfigError(f"{risk}. Set appendonly yes and appendfsync always in that server's redis.conf "
                      "(broker_config/redis.conf), or wait for replicas (a Redis URL with ?replicas=N), or "
                      "accept the risk with --ack-durability unchecked (FEDMASK_ACK_DURABILITY=unchecked)")


def _s(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
