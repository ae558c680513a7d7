"""Counting the dead letters the broker throws away.

dead.letters is bounded (shared/amqp/broker_topology.py: DEAD_LETTER_LIMITS): when full it drops its
oldest letter, and letters older than its TTL expire. RabbitMQ counts neither, so dead.letters
dead-letters both to fedmask.dropped -> dead.dropped, and the aggregator consumes dead.dropped here:
each letter is counted in the round store's counters and acked, its body discarded.

  dead_letters:dropped:maxlen    pushed out of a full dead.letters
  dead_letters:dropped:expired   older than dead.letters' TTL
  dead_letters:dropped:other     anything else (a letter that reached dead.dropped some other way)
  dead_letters:dropped_bytes     their bodies' bytes

A letter is acked only after Redis counted it, so nothing acked goes uncounted (a Redis failure between
the two increments can count one letter twice); what arrives while the aggregator is down waits in
dead.dropped (itself bounded: DROPPED_LIMITS, past which letters are lost uncounted) and is counted later.
`fedmask services status` shows the counters beside dead.letters' depth.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from aggregator.store import RoundStore, StoreError
from shared.amqp import DEAD_QUEUE, Delivery, Outcome

log = logging.getLogger("fedmask.aggregator")

COUNTER_PREFIX: Final = "dead_letters:dropped"
BYTES_COUNTER: Final = "dead_letters:dropped_bytes"
_REASONS: Final = frozenset({"maxlen", "expired"})
_RETRY_SECONDS: Final = 1.0


def drop_reason(headers: dict[str, object]) -> str:
    """Why dead.letters let the letter go: the reason RabbitMQ records for dead.letters in x-death."""
    deaths = headers.get("x-death")
    for death in deaths if isinstance(deaths, list) else []:
        if isinstance(death, dict) and str(death.get("queue", "")).endswith(DEAD_QUEUE):
            reason = str(death.get("reason", ""))
            return reason if reason in _REASONS else "other"
    return "other"


class DroppedTally:
    """The dead.dropped consumer's handler: count, then ack; requeue while Redis is unreachable."""

    def __init__(self, store: RoundStore, stop: threading.Event) -> None:
        self.store = store
        self.stop = stop

    def on_delivery(self, d: Delivery) -> Outcome:
        try:
            self.store.incr(f"{COUNTER_PREFIX}:{drop_reason(d.headers)}")
            self.store.incr(BYTES_COUNTER, len(d.body))
        except StoreError as err:
            # Never dead-letter a dropped letter (that would loop back here): keep it until Redis is back.
            log.warning("dropped dead letter not counted (%s); requeued", err)
            self.stop.wait(_RETRY_SECONDS)
            return Outcome.requeue()
        return Outcome.ack()
