"""StrategyRoundsCore: a weight-training strategy (shared/strategies/) as the aggregator service runs
it, `fedmask aggregator run --strategy S` (issue 12). Broker-free like aggregator/core.py: the
service hands it deliveries and it answers ack or reject with a reason; downlinks go through the
Transport it was given.

It is AggregatorCore with the message path swapped: the round machinery it inherits (the deadline
tick, the close election and its lease, take-over of a dead closer's close, resume, unreachable
boards, fault points) is the same code FedMask's rounds run. What differs:
  uplink   `shello` (a board: its strategy and settings digest) and `supdate` (StrategyCore.ingest:
           the strategy codec's checks, the base version, a dry fold; a reason for every refusal)
  rounds   start_round samples as FedMask's does and sends each sampled board its `stask`
           (StrategyCore.open_round: the model travels only to a board whose copy is stale)
  close    StrategyCore.close folds and publishes each participant's `smodel`, then commits (every
           strategy shipped today returns none: the next task carries the model to a stale board)
A late update is dropped (counted, rejected as round_closed): carrying a weight update into a round
folded from a newer model would average weights trained from different bases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aggregator.core import AggregatorCore
from aggregator.core_batch import ACK, Decision
from aggregator.core_strategy import StrategyCore
from aggregator.store import RoundInfo, RoundStore, StoreError
from shared.errors import CodecError
from shared.rounds import quorum_count
from shared.strategy_codec import MAX_BYTES, StrategyMessage, decode_strategy
from shared.strategy_setup import StrategySetup
from shared.transport import Transport

log = logging.getLogger("fedmask.aggregator")


class StrategyRoundsCore(AggregatorCore):
    def __init__(self, store: RoundStore, downlink: Transport, setup: StrategySetup, *, seed: int = 0,
                 clock: Callable[[], float] = time.time, max_update_bytes: int = MAX_BYTES) -> None:
        super().__init__(store, downlink, setup.spec, clock=clock)
        self.setup = setup
        self.fingerprint = setup.fingerprint  # what fm:config records and `round start` checks
        self.strategy = StrategyCore(store, setup.name, setup.cfg, setup.spec, seed=seed, rounds=setup.rounds,
                                     max_update_bytes=max_update_bytes)
        self.max_update_bytes = max_update_bytes

    # -- uplink -------------------------------------------------------------------------
    def handle(self, routing_key: str, user_id: str | None, body: bytes) -> Decision:
        try:
            msg = decode_strategy(body, max_bytes=self.max_update_bytes)
            check_strategy_sender(routing_key, user_id, msg)
            self._refuse_removed(msg.device)
            if msg.type == "shello":
                return self._shello(msg)
            if msg.type == "supdate":
                return self._supdate(msg, body)
            raise CodecError("wrong_type", f"boards may send shello or supdate, not {msg.type}")
        except CodecError as err:
            return self._refused(routing_key, err)

    def _shello(self, msg: StrategyMessage) -> Decision:
        if msg.strategy != self.setup.name:
            raise CodecError("wrong_strategy", f"{msg.device} runs {msg.strategy}; this aggregator runs "
                             f"{self.setup.name} (start the worker with --strategy {self.setup.name})")
        enrols = self.strategy.strategy.device.enrols
        if msg.parts and not enrols:  # only an enrolling strategy's hello (FedMask's structure) has a payload
            raise CodecError("forbidden_field", f"{msg.device}'s shello carries parts; {self.setup.name} takes none")
        if msg.model != self.fingerprint:
            raise CodecError("wrong_model", f"{msg.device}'s settings digest {msg.model} != {self.fingerprint} "
                             "(task, width, seed or tuned settings differ from the aggregator's)")
        # A weight-training board has no structure; an enrolling one's is checked by its server half
        # (FedMask: one pruning can make, the same as its first hello's). register_device keeps both.
        structure = self.strategy.enrol(msg) if enrols else b""
        try:
            self.store.register_device(msg.device, profile="", fingerprint=msg.model, structure=structure,
                                       now=self.clock())
        except StoreError as exc:  # two replicas took two different first hellos at once: the first stands
            if exc.retryable or not structure:
                raise
            raise CodecError("structure_changed", str(exc)) from None
        self.store.touch(msg.device, self.clock())
        self.store.clear_unreachable(msg.device)
        log.info("device %s enrolled (%s)", msg.device, self.setup.name)
        return ACK

    def _supdate(self, msg: StrategyMessage, body: bytes) -> Decision:
        if self.store.structure(msg.device) is None:
            raise CodecError("not_enrolled", f"{msg.device} sent an update before its hello")
        self._fault("consumed")
        adm = self.strategy.ingest(body, self.clock(), decoded=msg)
        self._fault("stored")
        if adm.status == "rejected":
            raise CodecError(adm.reason, adm.detail)
        if adm.status in ("stored", "duplicate"):
            loss = msg.stats.get("loss")
            stats = {"loss": float(loss)} if adm.status == "stored" and loss is not None else None
            self.store.note_update(msg.device, msg.round, f"updates:{adm.status}", stats=stats)
            if adm.elected:
                self.close(msg.round)
            return ACK
        if adm.elected:  # the deadline passed while this update was in flight
            self.close(msg.round)
        if adm.status == "closed":
            self.store.mark_reported(msg.device, msg.round)
            self.store.mark_late(msg.round, msg.device)
            self.store.incr("late:dropped")
            raise CodecError("round_closed", f"round {msg.round} closed before {msg.device}'s update")
        raise CodecError(adm.status, f"{msg.device}'s update for round {msg.round}: {adm.status}")

    def handle_batch(self, items: Any) -> Any:
        raise NotImplementedError("strategy rounds handle one delivery at a time (service.on_delivery)")

    # -- rounds -------------------------------------------------------------------------
    def start_round(self, *, rate: float | None = None, devices: int | None = None, quorum: float = 1.0,
                    deadline_s: float = 600.0, over_select: float = 1.0, seed: int = 0,
                    candidates: list[str] | None = None, late: str = "drop", max_staleness: int = 2,
                    min_wait: float = 0.0) -> RoundInfo:
        """Sample idle boards as FedMask's rounds do, open the round and send each its `stask`."""
        if late != "drop" or min_wait:
            raise StoreError(f"strategy rounds take --late drop and no --min-wait (got late {late}, "
                             f"min_wait {min_wait:g}): a late weight update was trained from an older model")
        r = (self.store.current_round() or 0) + 1
        target, sampled = self.sample_round(r, candidates, rate=rate, devices=devices, over_select=over_select,
                                            seed=seed, late=late, max_staleness=max_staleness)
        now = self.clock()
        tasks = self.strategy.open_round(r, sampled, now=now, deadline=now + deadline_s,
                                         quorum=quorum_count(target, quorum))
        self.store.mark_tasked(sampled, r)
        for d in sampled:
            self._send(d, tasks[d])  # an unreachable board just does not answer: the quorum decides
        info = self.store.info(r)
        assert info is not None
        log.info("round %d open (%s): %d sampled, quorum %d, deadline in %.0fs", r, self.setup.name,
                 len(sampled), info.quorum, deadline_s)
        return info

    def close(self, round_id: int) -> dict[str, Any]:
        """Fold, publish every participant's downlink (confirmed), commit: StrategyCore.close's order."""
        self._fault("merging")

        def publish(downlinks: dict[str, bytes]) -> None:
            for device, body in downlinks.items():
                self._send(device, body)
            self._fault("published_all")

        downlinks = self.strategy.close(round_id, self.clock(), publish=publish,
                                        on_closed=lambda: self.store.incr("rounds:closed"))
        log.info("round %d closed (%s): %d downlinks", round_id, self.setup.name, len(downlinks))
        return dict(downlinks)


def check_strategy_sender(routing_key: str, user_id: str | None, msg: StrategyMessage) -> None:
    """The broker-verified user must be the device the message names, on its own routing key
    (uplink.<device>.<type>), as shared.rounds.check_sender requires of FedMask's messages."""
    if (user_id or "") != msg.device:
        raise CodecError("spoofed_device", f"user {user_id!r} sent a message naming {msg.device!r}")
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[1] != msg.device or parts[2] != msg.type:
        raise CodecError("routing_mismatch", f"key {routing_key!r} for a {msg.type} from {msg.device!r}")
