"""The aggregator's asynchronous mode (`fedmask aggregator run --mode async`, issue 13): no rounds.

Every board trains whenever it is idle; its update names the merged-mask version it trained from (its
`base`) and the task number it answers. AsyncCore stores the update (aggregator/store_async.py: one
Lua step, persisted before the ack; a redelivered update id is a duplicate no-op), sends the board its
next task at once, and every K stored updates flushes: each buffered board gets its own merged mask
at once. The merge itself is shared.async_buffer.merge_buffered over the state Redis holds, the same
function the simulator's AsyncBuffer calls, so a replay of the stored order matches bit for bit.

Under the agreement rule (`--variant fedmask-agree`, fedmask-adapt, fedmask-adapt-local, fedpm) a flush
sends each buffered board theta over the same voters as 4-bit levels (enc "q4", shared.rounds.
agreement_message), Redis keeping that payload as published, as a round's close does; the board blends
it into its scores and names its version in its next update. Delta coding stays with the bit rules:
a `--coding delta` board's update is decoded at ingest against its held mask, and its flush mask coded
against the newest it holds (aggregator/async_delta.py).

Hellos, sender checks and downlinks reuse AggregatorCore (a subclass: only the update path and the
absence of rounds differ). One aggregator owns the stream: a flush is published before it is committed
(async_flush.lua), so a crash in between publishes the same flush again (devices drop repeats by version).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from aggregator.async_delta import DELTA_REFUSALS, code_downlink, downlink_base
from aggregator.core import AggregatorCore
from aggregator.core_batch import ACK, Decision
from aggregator.store_async import REPLAY_KEEP, AsyncStore, update_id
from shared import codec
from shared.async_buffer import STALENESS, Flush, Held, check_weighting, merge_buffered
from shared.errors import CodecError, ConfigError
from shared.rounds import DeviceRecord, agreement_message, check_update, mask_message, unpack_update

log = logging.getLogger("fedmask.aggregator")
TASK_DEADLINE_S = 24 * 3600.0  # async tasks have no round deadline; a day keeps the worker's check inert


class AsyncCore(AggregatorCore):
    def __init__(self, *args: Any, buffer_k: int = 3, max_staleness: int = 10, staleness: str = "constant",
                 replay_keep: int = REPLAY_KEEP, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if buffer_k < 1 or max_staleness < 0 or staleness not in STALENESS:
            raise ConfigError(f"async mode needs --buffer >= 1, --max-staleness >= 0 and --staleness in "
                              f"{', '.join(STALENESS)}; got {buffer_k}, {max_staleness}, {staleness!r}")
        try:
            check_weighting(self.rule, staleness)  # at start, not at the stream's first flush
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.k, self.max_staleness, self.staleness = buffer_k, max_staleness, staleness
        self.stream = AsyncStore(self.store, replay_keep=replay_keep)

    def describe_stream(self) -> str:
        """What a flush buffers and sends, for the service's start-up log."""
        weight = "each vote weighted 1/sqrt(1+tau)" if self.staleness == "sqrt" else "every vote weighted 1"
        sends = ("the agreement theta, as 4-bit levels inside its structure (q4)," if self.rule_downlink == "q4"
                 else f"its merged mask ({self.rule.name} rule, bits inside its structure),")
        return (f"async stream: a flush every {self.k} stored updates; each buffered board gets {sends} voted by "
                f"the buffered updates and the other boards' latest at most {self.max_staleness} versions old, "
                f"{weight}")

    def settings(self) -> dict[str, str]:
        """What fm:config records for `round status` / `watch`."""
        return {"mode": "async", "buffer": str(self.k), "max_staleness": str(self.max_staleness),
                "staleness": self.staleness}

    # -- uplink ---------------------------------------------------------------------------
    def _hello(self, msg: codec.Message) -> Decision:
        decision = super()._hello(msg)
        self.send_task(msg.device, 1)  # a redelivered hello re-sends task 1: the worker skips a done task
        return decision

    def _update(self, msg: codec.Message, body: bytes) -> Decision:
        self._refuse_removed(msg.device)
        rec = check_update(msg, self._record(msg.device))
        if msg.version is None:
            raise CodecError("bad_version", f"{msg.device}'s update names no base version")
        base = msg.version
        if msg.enc == "delta":
            msg, body = self._undelta_async(msg, rec, body)
        self._fault("consumed")
        status, pending = self.stream.put(msg.device, msg.round, body, base)
        self._fault("stored")
        if status == "future_base":
            raise CodecError("future_base", f"{msg.device}'s update names v {msg.version}, newer than the stream's")
        if status == "duplicate":
            self.stream.incr("duplicate")
            self.store.incr("updates:duplicate")
        else:
            self.store.incr("updates:stored")
        self.store.touch(msg.device, self.clock())
        # Also on a duplicate: a crash between storing and here left the board without its next task.
        self.send_task(msg.device, msg.round + 1)
        if pending >= self.k:
            self.flush()
        del rec
        return ACK

    def _undelta_async(self, msg: codec.Message, rec: DeviceRecord, body: bytes) -> tuple[codec.Message, bytes]:
        """A delta-coded update decoded against the merged mask it names, before it is stored (Redis keeps
        the raw update: the flush and the replay never see a delta). A redelivery of a stored task is left
        as it is (the store calls it a duplicate, even if its base is no longer held). A refused delta
        still sends the board its next task: in the stream no other message would, and the worker then
        codes raw bits (it never codes twice against one base), so the board resynchronises."""
        if msg.round <= self.stream.done_task(msg.device):
            return msg, body
        try:
            msg = self.undelta(msg, rec)
        except CodecError as err:
            if err.reason in DELTA_REFUSALS:
                self.stream.incr("refused_delta")
                self.send_task(msg.device, msg.round + 1)
            raise
        return msg, codec.encode(msg)

    def handle_batch(self, items: Any) -> Any:
        raise NotImplementedError("async mode handles one delivery at a time (service.on_delivery)")

    def send_task(self, device: str, task: int) -> None:
        """The task names the newest merged mask Redis holds for this board (0: the initial mask), not
        the stream's version: a delta-coding worker codes against its mask only when the versions agree."""
        version = self.store.mask_version(device)  # the newest stored mask's version, without its bytes
        msg = codec.make_task(device=device, round=task, model=self.fingerprint, layout=self.layout, bits=b"",
                              nbits=0, version=version, deadline=self.clock() + TASK_DEADLINE_S)
        self._send(device, codec.encode(msg))

    # -- flush ----------------------------------------------------------------------------
    def flush(self) -> Flush | None:
        """Merge the buffer from Redis's state, publish each buffered board's mask, then commit. A board
        removed since (`fedmask devices remove`) is dropped: its buffered update is not merged, nothing is
        sent to it, and its latest update is forgotten at the commit (it votes for nobody again)."""
        st = self.stream.state()
        if st.counts.get("pending", 0) < self.k or not st.buffer:
            return None
        latest, structures, records, removed = self.held_state(st.latest, st.base)
        out = merge_buffered(self.rule, self.ctx, st.version, latest, st.buffer, structures,
                             self.max_staleness, self.staleness, removed)
        self._fault("merging")
        kept = {}
        coded_against = self.downlink_bases(out, st.latest, records)
        for device, msg in self.flush_messages(out, records, coded_against).items():
            self._send(device, codec.encode(msg))
            kept[device] = (msg.bits or b"") if out.theta is not None else out.masks[device].tobytes()
        self.store.set_masks(kept, out.version)  # idempotent
        self._fault("published_all")
        if self.stream.commit_flush(st.version, out.boards, out.voters, removed, out.dropped):
            if out.dropped:  # the service's count beside updates:stored (a crash before it loses it, as those)
                self.store.incr("updates:dropped_removed", len(out.dropped))
            for device in out.dropped:
                log.info("async flush v%d: %s's buffered update dropped, not merged: the device was removed",
                         out.version, device)
            log.info("async flush v%d: %d buffered merged, %d voters, %d too stale", out.version, len(out.boards),
                     out.voters, out.stale_excluded)
        for device in removed:
            self._records.pop(device, None)  # a re-enrolled id says hello with a structure of its own
        return out

    def flush_messages(self, out: Flush, records: dict[str, DeviceRecord],
                       coded_against: dict[str, tuple[int, np.ndarray]] | None = None) -> dict[str, codec.Message]:
        """Each buffered board's downlink: its merged bits (delta-coded against the (version, packed full
        mask) of `coded_against`, for the boards it names, when that pays), or under the agreement rule
        theta inside its structure as q4 levels (what Redis keeps then: the payload as published)."""
        v, fp, lay, n, theta = out.version, self.fingerprint, self.layout, self.nbits, out.theta
        if theta is not None:
            return {d: agreement_message(d, theta, records[d], round_id=v, fingerprint=fp, layout=lay, nbits=n)
                    for d in out.boards}
        bases = coded_against or {}
        msgs = {d: mask_message(d, out.masks[d], records[d], round_id=v, fingerprint=fp, layout=lay, nbits=n)
                for d in out.boards}
        return {d: code_downlink(m, bases[d][1], bases[d][0], records[d], nbits=n, layer_sizes=self.layer_sizes)
                if d in bases else m for d, m in msgs.items()}

    def downlink_bases(self, out: Flush, latest: dict[str, bytes],
                       records: dict[str, DeviceRecord]) -> dict[str, tuple[int, np.ndarray]]:
        """The buffered boards whose flush mask may go delta-coded: (version, packed full mask) of the
        merged mask each holds (aggregator/async_delta.py downlink_base). Bit rules only."""
        if out.theta is not None:
            return {}
        bases = {}
        for d in out.boards:
            base = downlink_base(codec.decode(latest[d], expect_type="update"), self.store.held_masks(d),
                                 out.version)
            full = self._held(d)(base) if base is not None else None
            if base is not None and full is not None and d in records:
                bases[d] = (base, full)
        return bases

    def held_state(self, bodies: dict[str, bytes], bases: dict[str, int]) -> tuple[
            dict[str, Held], dict[str, np.ndarray], dict[str, DeviceRecord], list[str]]:
        """The latest updates that vote, their structures and records, and the boards removed since they
        were stored (in Redis's removed set, or with no structure left), which neither vote nor merge.
        The removed set is read here, not the record cache: `devices remove` runs in another process."""
        removed_ids = self.store.removed()
        latest, structures, records, removed = {}, {}, {}, []
        for device, body in bodies.items():
            rec = None if device in removed_ids else self._record(device)
            if rec is None:
                removed.append(device)
                continue
            msg = codec.decode(body, expect_type="update")
            latest[device] = Held(unpack_update(msg, rec, self.nbits), bases[device], update_id(device, msg.round))
            structures[device], records[device] = rec.structure, rec
        return latest, structures, records, sorted(removed)

    def tick(self) -> None:
        self.flush()  # a flush a crash cut short (or due at restart) runs at the next tick

    def resume(self) -> list[int]:
        out = self.flush()
        return [out.version] if out is not None else []

    def start_round(self, **_: Any) -> Any:
        raise ConfigError("the aggregator runs in async mode: there are no rounds; boards get tasks as they answer")
