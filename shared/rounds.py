"""Round logic, pure: sampling, update validation, quorum, merging, downlink messages.

The simulator keeps round state in memory; the aggregator service keeps the same state in Redis and
calls these same functions, so the same seeds give the same masks. Round membership (which update a
round takes) is decided in the service by aggregator/lua/admit_update.lua, atomically; admit_update
below is its in-memory copy for the simulator, and tests/membership_cases.py is the one table of cases
both are tested against (tests/integration/test_membership_rules.py runs it on real Redis).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from shared import codec
from shared.agreement import pack_levels, quantize
from shared.bits import Spans, popcount, positions, scatter_spans, select_at, select_spans, spans
from shared.delta_codec import code_mask, decode_change, layer_segments
from shared.device import derive_seed
from shared.errors import CodecError
from shared.merge_rules import MergeContext, MergeRule
from shared.structures import StructureRule, check_structure
from shared.transport import Envelope


def sample_devices(candidates: list[str], count: int, *, seed: int, round_id: int) -> list[str]:
    """Draw `count` distinct devices for a round; depends only on (seed, round, candidate set)."""
    pool = sorted(candidates)
    if not pool:
        return []
    count = max(1, min(count, len(pool)))
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "sample", round_id)))
    chosen = rng.choice(len(pool), size=count, replace=False)
    return sorted(pool[i] for i in chosen)


def sample_count(population: int, *, rate: float | None = None, devices: int | None = None,
                 over_select: float = 1.0) -> int:
    """How many to ask: a rate of the population or an absolute count, times the over-selection."""
    base = devices if devices is not None else math.ceil((rate if rate is not None else 1.0) * population)
    return max(1, min(population, math.ceil(base * over_select)))


def quorum_count(sampled: int, quorum: float) -> int:
    return max(1, math.ceil(quorum * sampled - 1e-9))


def quorum_members(arrivals: dict[str, float], quorum: int, *, min_wait: float = 0.0,
                   deadline: float = math.inf) -> set[str]:
    """Which sampled devices' updates a round merges, given when each answers (seconds after the
    round opened; math.inf: never): the rule of aggregator/lua/close_round.lua. The round closes at
    the quorum-th answer, but not before `min_wait`, and at the deadline at the latest; every update
    stored by then is in. With min_wait 0 the first `quorum` answers fill the round, so the fastest
    boards are always in it; with a minimum wait, every board answering within it is."""
    times = sorted(arrivals.values())
    quorum_at = times[quorum - 1] if 0 < quorum <= len(times) else math.inf
    closes = min(max(quorum_at, min_wait), deadline)
    return {d for d, t in arrivals.items() if t <= closes and t < math.inf}


@dataclass
class DeviceRecord:
    structure: np.ndarray  # packed S_i
    version: int = 0
    _where: np.ndarray | None = field(default=None, repr=False, compare=False)
    _spans: Spans | None = field(default=None, repr=False, compare=False)

    @property
    def inside(self) -> int:
        return popcount(self.structure) if self._where is None else len(self._where)

    def where(self, nbits: int) -> np.ndarray:
        """Positions of S_i's 1 bits, cached: every update and merged mask of the device reuses them."""
        if self._where is None:
            self._where = positions(self.structure, nbits)
        return self._where

    def spans(self, nbits: int) -> Spans:
        """The same positions as runs and the scattered rest (shared.bits.Spans), cached: what the
        per-round select and scatter of the device's bits use."""
        if self._spans is None:
            self._spans = spans(self.where(nbits), nbits)
        return self._spans


@dataclass
class RoundState:
    round_id: int
    sampled: list[str]
    deadline: float
    quorum: int
    received: dict[str, np.ndarray] = field(default_factory=dict)  # device -> packed full mask
    state: str = "open"
    # device -> the round of its update, for devices whose update asked for a delta-coded merged mask
    delta_downlink: dict[str, int] = field(default_factory=dict)


UpdateStatus = Literal["stored", "duplicate", "closed", "not_sampled", "unknown_round"]
"""What a round makes of a device's update: admit_update here, admit_update.lua (mode store) in Redis."""


def check_sender(env: Envelope, msg: codec.Message, *, fingerprint: str, layout: str) -> None:
    """Identity, model and routing checks that need no round state (the broker has verified env.user_id).
    Identity first: a device on its own key naming another device inside is a spoof, and is counted as
    one, not as a routing slip."""
    if env.user_id != msg.device:
        raise CodecError("spoofed_device", f"user {env.user_id!r} sent a message naming {msg.device!r}")
    if msg.model != fingerprint:
        raise CodecError("wrong_model", f"fingerprint {msg.model} != {fingerprint}")
    if msg.layout != layout:
        raise CodecError("wrong_layout", f"layout {msg.layout} != {layout}")
    parts = env.routing_key.split(".")
    if len(parts) != 3 or parts[1] != msg.device or parts[2] != msg.type:
        raise CodecError("routing_mismatch", f"key {env.routing_key!r} for a {msg.type} from {msg.device!r}")


def check_hello(msg: codec.Message, rule: StructureRule, known: bytes | None) -> np.ndarray:
    """A hello's structure, packed, if the server may take it: all the model's bits (bad_length), the
    same structure as the device's first hello if there was one (structure_changed: the first one
    stands, so a board cannot move its votes later), and one pruning can produce (bad_structure)."""
    if msg.enc != "full" or msg.nbits != rule.nbits or msg.bits is None:
        raise CodecError("bad_length", f"a hello carries all {rule.nbits} structure bits")
    if known is not None and known != msg.bits:
        raise CodecError("structure_changed", f"{msg.device} announced another structure before")
    structure = np.frombuffer(msg.bits, dtype=np.uint8).copy()
    check_structure(structure, rule)
    return structure


def receive_hello(env: Envelope, msg: codec.Message, *, fingerprint: str, layout: str, rule: StructureRule,
                  records: dict[str, DeviceRecord]) -> DeviceRecord:
    """The simulator's intake of one hello, with the aggregator service's checks: sender, then the
    structure (check_hello). Records the device, or raises CodecError with the service's reason."""
    check_sender(env, msg, fingerprint=fingerprint, layout=layout)
    known = records.get(msg.device)
    structure = check_hello(msg, rule, None if known is None else known.structure.tobytes())
    if known is None:
        known = records[msg.device] = DeviceRecord(structure=structure)
    return known


def check_update(msg: codec.Message, rec: DeviceRecord | None,
                 encodings: tuple[str, ...] = ("structure", "delta")) -> DeviceRecord:
    """An update must come from a device that said hello and carry exactly its structure's bit count
    (the codec has already checked the byte length, padding and CRC against that count)."""
    if rec is None:
        raise CodecError("unknown_device", f"{msg.device} has not sent a hello")
    if msg.enc not in encodings or msg.nbits != rec.inside or msg.bits is None:
        raise CodecError("bad_length", f"expected {rec.inside} structure bits, got {msg.nbits} ({msg.enc})")
    return rec


def unpack_update(msg: codec.Message, rec: DeviceRecord | None, nbits: int) -> np.ndarray:
    """The update's packed full mask; its bit count must equal the device's structure size. A delta-coded
    update is decoded first (undelta_update)."""
    rec = check_update(msg, rec, ("structure",))
    assert msg.bits is not None  # check_update guarantees it
    return scatter_spans(np.frombuffer(msg.bits, dtype=np.uint8), rec.spans(nbits))


HeldMask = Callable[[int], "np.ndarray | None"]
"""The packed full merged mask of a given version the receiver holds for a device, or None."""


def undelta_update(msg: codec.Message, rec: DeviceRecord | None, nbits: int, held: HeldMask) -> codec.Message:
    """A delta-coded update as the raw update it codes (enc "structure"; downlink kept), decoded
    against `held(msg.base)`; any other update as it is. Raises CodecError: stale_base (that version is
    not held), bad_delta (a malformed payload), bad_base (the decoded mask's CRC32 differs)."""
    if msg.enc != "delta":
        return msg
    rec = check_update(msg, rec)
    assert msg.bits is not None and msg.base is not None and msg.mask_crc32 is not None  # the codec checked
    full = held(msg.base)
    if full is None:
        raise CodecError("stale_base", f"{msg.device}'s update is coded against mask v{msg.base}, "
                         "which the aggregator does not hold")
    base = select_at(full, rec.where(nbits), nbits).tobytes()
    bits = decode_change(msg.bits, base, rec.inside, msg.mask_crc32)
    return replace(msg, enc="structure", bits=bits, crc32=zlib.crc32(bits), base=None, mask_crc32=None)


def admit_update(rnd: RoundState | None, device: str) -> UpdateStatus:
    """Whether round `rnd` (None: never opened) takes `device`'s update: the checks of
    aggregator/lua/admit_update.lua in mode store, in its order. Membership before duplicates (a device
    the round did not sample is refused every time); duplicates before the round's state (a redelivery
    after the close is still a no-op, not a late update)."""
    if rnd is None:
        return "unknown_round"
    if device not in rnd.sampled:
        return "not_sampled"
    if device in rnd.received:
        return "duplicate"
    if rnd.state != "open":
        return "closed"
    return "stored"


def refusal(status: UpdateStatus, msg: codec.Message) -> CodecError:
    """The dead-letter reason of an update the round refused ("closed" is a late update: round_closed)."""
    if status == "closed":
        return CodecError("round_closed", f"round {msg.round} closed before {msg.device}'s update")
    return CodecError(status, f"round {msg.round}, device {msg.device}")


def receive_update(env: Envelope, msg: codec.Message, *, fingerprint: str, layout: str, nbits: int,
                   rnd: RoundState | None, records: dict[str, DeviceRecord],
                   held: HeldMask | None = None) -> UpdateStatus:
    """The simulator's intake of one update, in the aggregator service's order: sender, then the
    device's structure, then round membership. Records the update's packed full mask in rnd.received
    and returns "stored", or returns "duplicate" (the first update stands, as in Redis); anything else
    raises CodecError with the reason the service dead-letters with.

    `rnd` is the state of the round the update names (None, or another round's: never opened here).
    The simulator has no late updates, so a closed round is always round_closed (the "drop" policy).
    `held(version)`: the device's merged mask of that version, to decode a delta-coded update against.
    """
    check_sender(env, msg, fingerprint=fingerprint, layout=layout)
    rec = check_update(msg, records.get(msg.device))
    msg = undelta_update(msg, rec, nbits, held if held is not None else lambda _version: None)
    status = admit_update(rnd if rnd is not None and rnd.round_id == msg.round else None, msg.device)
    if status == "duplicate":
        return status
    if status != "stored":
        raise refusal(status, msg)
    assert rnd is not None  # admitted, so the round exists
    rnd.received[msg.device] = unpack_update(msg, rec, nbits)
    if msg.downlink == "delta":
        rnd.delta_downlink[msg.device] = msg.round
    return status


def merge_round(rule: MergeRule, ctx: MergeContext, rnd: RoundState,
                records: dict[str, DeviceRecord]) -> dict[str, np.ndarray]:
    """Each participant's packed full merged mask (participants = devices whose update arrived)."""
    devices = sorted(rnd.received)
    if not devices:
        return {}
    structures = np.stack([records[d].structure for d in devices])
    masks = np.stack([rnd.received[d] for d in devices])
    merged = rule.merge(structures, masks, ctx)
    return dict(zip(devices, merged, strict=True))


def mask_message(device: str, merged: np.ndarray, rec: DeviceRecord, *, round_id: int,
                 fingerprint: str, layout: str, nbits: int) -> codec.Message:
    """Downlink: only the bits inside the device's structure.

    The version is the round id: monotonic, and the same when a crashed close is resumed and its
    masks are published again, so a device can drop a repeat by version alone.
    """
    inside = select_spans(merged, rec.spans(nbits))
    return codec.make_mask(device=device, round=round_id, model=fingerprint, layout=layout,
                           bits=inside.tobytes(), nbits=rec.inside, version=round_id)


def delta_downlink(msg: codec.Message, rnd: RoundState, rec: DeviceRecord, *, nbits: int,
                   layer_sizes: Sequence[int]) -> codec.Message:
    """A bit rule's merged mask coded against the update the device sent (the device keeps it), if its
    update asked for that and coding pays; else `msg` as it is. The device's own update is the closest
    base it holds: a merged mask differs from it only where the rule voted (docs/results.md)."""
    round_of_update = rnd.delta_downlink.get(msg.device)
    if round_of_update is None or msg.enc != "structure" or msg.bits is None or msg.nbits is None:
        return msg
    where = rec.where(nbits)
    base = select_at(rnd.received[msg.device], where, nbits).tobytes()
    coded = code_mask(msg.bits, msg.nbits, base, round_of_update, layer_segments(where, layer_sizes))
    if coded.enc == "structure":
        return msg
    return replace(msg, enc="delta", bits=coded.bits, crc32=zlib.crc32(coded.bits), base=coded.base,
                   mask_crc32=coded.mask_crc32)


def agreement_message(device: str, theta: np.ndarray, rec: DeviceRecord, *, round_id: int,
                      fingerprint: str, layout: str, nbits: int) -> codec.Message:
    """Downlink of the agreement rule: theta inside the device's structure as 4-bit levels."""
    packed, n = pack_levels(quantize(theta[rec.where(nbits)]))
    return codec.make_mask(device=device, round=round_id, model=fingerprint, layout=layout, bits=packed,
                           nbits=n, version=round_id, enc="q4")


def downlink_messages(rule: MergeRule, ctx: MergeContext, rnd: RoundState, records: dict[str, DeviceRecord], *,
                      fingerprint: str, layout: str) -> dict[str, codec.Message]:
    """Every participant's downlink for a closing round: merged bits, or agreement levels for a rule
    whose downlink is "q4". The simulator and the aggregator service both call this."""
    kw = {"round_id": rnd.round_id, "fingerprint": fingerprint, "layout": layout, "nbits": ctx.nbits}
    if getattr(rule, "downlink", "bits") == "q4":
        devices = sorted(rnd.received)
        if not devices:
            return {}
        structures = np.stack([records[d].structure for d in devices])
        theta = rule.theta(structures, np.stack([rnd.received[d] for d in devices]), ctx)  # type: ignore[attr-defined]
        return {d: agreement_message(d, theta, records[d], **kw) for d in devices}  # type: ignore[arg-type]
    return {d: mask_message(d, merged, records[d], **kw)  # type: ignore[arg-type]
            for d, merged in merge_round(rule, ctx, rnd, records).items()}


def agreement_broadcast(rule: MergeRule, ctx: MergeContext, rnd: RoundState, records: dict[str, DeviceRecord], *,
                        fingerprint: str, layout: str) -> dict[str, codec.Message]:
    """The closed round's agreement for every recorded device that was not in it (FedPM's final
    broadcast: with share 1 every device then holds the one global model FedPM evaluates)."""
    if getattr(rule, "downlink", "bits") != "q4":
        raise ValueError(f"broadcast_final needs the agreement rule, not {rule.name!r}")
    if not rnd.received:
        return {}
    got = sorted(rnd.received)
    theta = rule.theta(np.stack([records[d].structure for d in got]),  # type: ignore[attr-defined]
                       np.stack([rnd.received[d] for d in got]), ctx)
    return {d: agreement_message(d, theta, records[d], round_id=rnd.round_id, fingerprint=fingerprint,
                                 layout=layout, nbits=ctx.nbits)
            for d in sorted(set(records) - set(got))}
