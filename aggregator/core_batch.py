"""A prefetch window of uplink messages handled as one batch: decode and check each, persist all the
updates in one Redis round trip (RoundStore.ingest_batch), one Decision per message.

Why: one update at a time cost two Redis round trips carrying 70 kB each and the consumer one
thread hand-off and one AMQP commit per message; ingest ran at 0.16x a plain pika consumer
(docs/results.md, issue 14). The checks are the single-message path's (AggregatorCore.handle), in the
same order per message, and messages keep their delivery order: a hello is handled after the updates
before it are stored, so an update never overtakes its own board's hello or the other way round.

Isolation: a message that fails its checks is rejected with its reason; one that raises anything
else (a bug its bytes trigger) gets its exception as its result, which the consumer retries and
dead-letters alone (handler_error). Neither touches its neighbours. Only an unreachable Redis fails
the whole batch (StoreError, retryable): then nothing of it has been acked, and the retry is
idempotent (stored updates come back as duplicates and are acked).

Closing: a round this batch elected to close is returned in `to_close`, not closed here, so the
batch's acks go out before the merge (a close takes a second at 1M parameters) and the service runs
the close once they are scheduled (aggregator/service.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aggregator.round_stats import stats_row
from aggregator.store import StoreError
from aggregator.store_batch import BatchUpdate
from shared import codec
from shared.errors import CodecError
from shared.log_safety import printable
from shared.rounds import check_sender, check_update, refusal
from shared.transport import Envelope

if TYPE_CHECKING:
    from aggregator.core import AggregatorCore

@dataclass(frozen=True)
class Decision:
    """What the consumer does with a delivery: ack, or reject to dead.letters with a reason."""

    action: str  # "ack" | "reject"
    reason: str = ""


ACK = Decision("ack")


@dataclass
class BatchDecisions:
    results: list[Decision | Exception]  # one per message, in order
    to_close: list[int] = field(default_factory=list)  # rounds this batch elected this process to close


@dataclass(frozen=True)
class _Staged:
    index: int
    routing_key: str
    msg: codec.Message
    body: bytes


class _Batch:
    def __init__(self, core: AggregatorCore, items: Sequence[tuple[str, str | None, bytes]]) -> None:
        self.core, self.items = core, items
        self.results: list[Decision | Exception | None] = [None] * len(items)
        self.staged: list[_Staged] = []
        self.rejected: Counter[str] = Counter()  # counted in the batch's own round trip
        self.to_close: list[int] = []

    def run(self) -> BatchDecisions:
        decoded: list[codec.Message | None] = [self._decode(i) for i in range(len(self.items))]
        self._prefetch_records([m for m in decoded if m is not None and m.type == "update"])
        for i, msg in enumerate(decoded):
            if msg is None:
                continue
            try:
                if msg.type == "update":
                    self._stage(i, msg)
                    continue
                self._flush()  # the updates before a hello are stored before it (delivery order)
                if msg.type == "hello":
                    self.results[i] = self.core._hello(msg)
                else:
                    raise CodecError("wrong_type", f"devices may send hello or update, not {msg.type}")
            except CodecError as err:
                self._reject(i, err)
            except StoreError as err:
                if err.retryable:
                    raise  # Redis is gone: the whole batch is retried, nothing of it acked
                self.results[i] = err
            except Exception as err:  # a bug this message triggers fails it alone
                self.results[i] = err
        self._flush()
        if self.rejected:
            self.core.store.ingest_batch([], self.core.clock(), dict(self.rejected))
        out = [r for r in self.results if r is not None]
        assert len(out) == len(self.results), "every message of a batch has a result"
        return BatchDecisions(out, self.to_close)

    def _decode(self, i: int) -> codec.Message | None:
        routing_key, user_id, body = self.items[i]
        try:
            msg = codec.decode(body)
            check_sender(Envelope(routing_key, user_id or "", body), msg, fingerprint=self.core.fingerprint,
                         layout=self.core.layout)
            return msg
        except CodecError as err:
            self._reject(i, err)
        except Exception as err:
            self.results[i] = err
        return None

    def _prefetch_records(self, updates: list[codec.Message]) -> None:
        """The structures of boards not cached yet, in one MGET (the first round after a start)."""
        missing = sorted({m.device for m in updates} - self.core._records.keys())
        if missing:
            for device, structure in self.core.store.structures(missing).items():
                if structure is not None:
                    self.core._record_from(device, structure)

    def _stage(self, i: int, msg: codec.Message) -> None:
        routing_key, _, body = self.items[i]
        rec = check_update(msg, self.core._record(msg.device))
        if msg.enc == "delta":  # decoded at ingest, as in AggregatorCore._update
            msg = self.core.undelta(msg, rec)
            body = codec.encode(msg)
        self.core._fault("consumed")
        self.staged.append(_Staged(i, routing_key, msg, body))

    def _flush(self) -> None:
        if not self.staged:
            return
        staged, self.staged = self.staged, []
        now = self.core.clock()
        batch = [BatchUpdate(s.msg.round, s.msg.device, s.body, _stats_json(s.msg)) for s in staged]
        counters, self.rejected = dict(self.rejected), Counter()
        for s, res in zip(staged, self.core.store.ingest_batch(batch, now, counters), strict=True):
            self.core._fault("stored")
            if res.error:
                self.results[s.index] = StoreError(f"{s.msg.device}'s update, round {s.msg.round}: {res.error}")
                continue
            if res.elected:
                self.to_close.append(s.msg.round)
            try:
                if res.status in ("stored", "duplicate"):
                    self.results[s.index] = ACK
                elif res.status == "removed":
                    raise CodecError("device_removed", f"device {s.msg.device} was removed by an operator; "
                                     "enrol it again to bring it back")
                elif res.status == "closed":
                    self.results[s.index] = self.core._late(s.msg, s.body, now)
                else:
                    raise refusal(res.status, s.msg)  # type: ignore[arg-type]  # not_sampled, unknown_round
            except CodecError as err:
                self._reject(s.index, err)

    def _reject(self, i: int, err: CodecError) -> None:
        self.rejected[f"rejected:{err.reason}"] += 1
        self.core.rejections.note(err.reason, f"{printable(self.items[i][0])}: {printable(str(err))}")
        self.results[i] = Decision("reject", err.reason)


def _stats_json(msg: codec.Message) -> str:
    row = stats_row(msg.stats)
    return json.dumps(row, sort_keys=True) if row else ""


def handle_batch(core: AggregatorCore, items: Sequence[tuple[str, str | None, bytes]]) -> BatchDecisions:
    """See the module docstring; items are (routing key, the device the sender speaks for, body)."""
    return _Batch(core, items).run()

