"""StrategyCore: the round logic of a weight-training strategy (shared/strategies/) over Redis
(issue 12, roadmap items 2-3). Broker-free like aggregator/core.py: the caller moves the bytes.

A round: open_round() builds each sampled device's `stask` (with the model when the device's copy is
stale) from the server half's state in Redis, opens the round with RoundStore's machinery (the same
open/quorum/close election as FedMask's rounds) and returns the tasks to send. ingest() admits one
untrusted `supdate`: the strategy codec's checks (size limit, schema, parts' sizes and crc), then
the round, the strategy, the base version (`stale_base` unless it is the version this device was
sent) and a dry fold of the update alone on a copy of the state (shapes and encodings the half
expects); a refused update gets a reason and is not stored, so the caller dead-letters it as the
FedMask path does. An admitted one is stored with SET NX (aggregator/lua/admit_update.lua). close()
folds the stored updates, writes the new state and returns the participants' `smodel` downlinks
(none for a strategy with one global model: its next task carries it).

The server half is read from Redis on every call (a copy of the last one built while Redis holds the
same state), so any replica may serve any step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from aggregator.store import RoundStore, StoreError
from aggregator.store_strategy import StrategyStateStore
from shared.errors import CodecError
from shared.models import ModelSpec
from shared.strategies import get_strategy
from shared.strategies.base import ServerHalf, StrategyConfig
from shared.strategy_codec import MAX_BYTES, StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import config_fields as config_fields  # re-exported: fm:config's strategy fields


@dataclass(frozen=True)
class Admission:
    """What ingest() did with one update: status is "stored", "duplicate", "closed", "not_sampled",
    "unknown_round" (RoundStore's) or "rejected" (then `reason` is the codec's or the core's code)."""

    status: str
    device: str = ""
    round_id: int = -1
    reason: str = ""
    detail: str = ""
    elected: bool = False


class StrategyCore:
    def __init__(self, store: RoundStore, name: str, cfg: StrategyConfig, spec: ModelSpec, *, seed: int,
                 rounds: int, max_update_bytes: int = MAX_BYTES) -> None:
        self.store, self.state = store, StrategyStateStore(store)
        self.strategy = get_strategy(name)
        self.cfg, self.spec, self.seed, self.rounds = cfg, spec, seed, rounds
        self.max_update_bytes = max_update_bytes
        self._cached: tuple[bytes, ServerHalf] | None = None  # see server()

    def server(self) -> ServerHalf:
        """The server half with the state Redis holds (its initial state, written once, if none).

        Building a half initialises a model (about 50 ms at 270k weights, more than loading its state),
        so the last half built is kept with the state JSON it was loaded from, and a copy of it is
        returned while Redis holds that same JSON. That is safe across replicas: every save writes the
        JSON and the tensors in one MULTI, and the JSON holds the half's version (a hash of its weights)
        and its last folded round, so the same JSON means the same state."""
        raw = self.state.raw()
        if raw is not None and self._cached is not None and self._cached[0] == raw:
            return copy.deepcopy(self._cached[1])
        half = self.strategy.server(self.spec, self.cfg, seed=self.seed, rounds=self.rounds)
        if raw is None:
            self.state.save(half)
        else:
            self.state.load(half)
        loaded = self.state.raw()
        if loaded is not None and (raw is None or loaded == raw):  # not cached if a save raced the load
            self._cached = (loaded, copy.deepcopy(half))
        return half

    def adopt(self, half: ServerHalf, devices: Iterable[str]) -> None:
        """Hand a half that needs them (ServerHalf.enrolled_structures) the enrolled structures of
        `devices`, as RoundStore keeps them (one key per device, written once at its hello)."""
        if not half.enrolled_structures:
            return
        for d in devices:
            structure = self.store.structure(d)
            if structure:
                half.adopt(d, structure)

    def enrol(self, hello: StrategyMessage) -> bytes:
        """Check an enrolling strategy's hello with the half's enrol() against the structure already
        stored for the device (a re-hello must repeat it: structure_changed); returns the structure
        to register. The caller checked the hello's settings digest: the half sees its own model name."""
        half = self.server()
        self.adopt(half, [hello.device])
        half.enrol(replace(hello, model=half.hello_model()))
        return hello.part("structure").values

    def open_round(self, round_id: int, sampled: list[str], *, now: float, deadline: float,
                   quorum: int) -> dict[str, bytes]:
        half = self.server()
        tasks = {d: encode_strategy(half.task(round_id, d)) for d in sampled}
        self.state.save(half)  # the versions sent (held) decide stale_base and the next tasks' models
        self.store.open_round(round_id, sampled=sampled, deadline=deadline, quorum=quorum, now=now,
                              policy={"strategy": self.strategy.name})
        return tasks

    def ingest(self, body: bytes, now: float, decoded: StrategyMessage | None = None) -> Admission:
        """`decoded`: `body` as the caller already decoded it with this core's limits (the service's
        sender checks need it first), so the update is not decoded twice on the ingest path."""
        try:
            msg = decoded if decoded is not None else \
                decode_strategy(body, max_bytes=self.max_update_bytes, expect_type="supdate")
            if msg.type != "supdate":
                raise CodecError("wrong_type", f"expected supdate, got {msg.type}")
        except CodecError as exc:
            return Admission("rejected", reason=exc.reason, detail=str(exc)[:200])
        base = Admission("rejected", device=msg.device, round_id=msg.round)
        if msg.strategy != self.strategy.name:
            return _with(base, "wrong_strategy", f"{msg.strategy} update for a {self.strategy.name} aggregator")
        half = self.server()
        self.adopt(half, [msg.device])
        if half.held.get(msg.device) != msg.model:
            return _with(base, "stale_base", f"base {msg.model[:16]} is not the version {msg.device} was sent")
        try:
            half.fold(msg.round, {msg.device: msg})  # a dry run on this copy: the state is not saved
        except CodecError as exc:
            return _with(base, exc.reason, str(exc)[:200])
        except (ValueError, KeyError, IndexError) as exc:  # a well-formed part the half cannot use
            return _with(base, "bad_value", f"{type(exc).__name__}: {str(exc)[:160]}")
        status, elected = self.store.ingest_update(msg.round, msg.device, body, now)
        return Admission(status, device=msg.device, round_id=msg.round, elected=elected)

    def close(self, round_id: int, now: float, publish: Callable[[dict[str, bytes]], None] | None = None,
              on_closed: Callable[[], None] | None = None) -> dict[str, bytes]:
        """Fold the round's stored updates (the caller won the close election); returns the encoded
        downlinks by device. Updates were checked at ingest; a stored one that no longer decodes
        means Redis was written by someone else, which stops the close.

        Order, so that a crash at any step ends as an undisturbed close: fold in memory, `publish`
        the downlinks (confirmed), save the folded state with `closed_round` in one MULTI, mark the
        round closed. A close resumed before the save folds the same state again (the fold is
        deterministic: the same downlinks, which devices apply idempotently); one resumed after it
        finds `closed_round` and only marks the round closed: a round is never folded twice.
        `on_closed` runs only in the call whose mark closed the round (a resumed close racing the
        first one does not count it twice: the rounds:closed counter)."""
        half = self.server()
        if half.closed_round >= round_id:
            if self.store.mark_closed(round_id, now) and on_closed is not None:
                on_closed()
            return {}
        updates: dict[str, StrategyMessage] = {}
        for device, body in self.store.updates(round_id).items():
            try:
                updates[device] = decode_strategy(body, max_bytes=self.max_update_bytes, expect_type="supdate")
            except CodecError as exc:
                raise StoreError(f"round {round_id}: the stored update of {device} does not decode: {exc}") from None
        self.adopt(half, self.store.device_ids())  # every enrolled device: FedPM's final broadcast reaches all
        downlinks = {d: encode_strategy(m) for d, m in half.fold(round_id, updates).items()}
        if publish is not None:
            publish(downlinks)
        half.closed_round = round_id
        self.state.save(half)
        if self.store.mark_closed(round_id, now) and on_closed is not None:
            on_closed()
        return downlinks

    def model_message(self, device: str) -> bytes:
        return encode_strategy(self.server().model_message(device))

    def version(self) -> str:
        return str(getattr(self.server(), "version", ""))


def _with(base: Admission, reason: str, detail: str) -> Admission:
    return Admission(base.status, device=base.device, round_id=base.round_id, reason=reason, detail=detail)
