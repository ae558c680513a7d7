"""One table of round-membership cases: which updates a round takes, and why it refuses the others.

Two paths decide this: the simulator's (shared.rounds.receive_update over in-memory RoundStates) and
the aggregator service's (AggregatorCore.handle, whose membership checks are aggregator/lua/
admit_update.lua, run atomically in Redis). tests/unit/test_rounds.py runs the table through the
simulator's path; tests/integration/test_membership_rules.py runs it through both on real Redis and
asserts, case by case, that they agree with each other and with the expected outcome.

Every case starts with devices a, b and c enrolled (they said hello) and z not; then opens the rounds
of `rounds` in order, each with the updates already delivered to it, and leaves each in its state; then
delivers one update. The outcome is "stored", "duplicate" (acked; the first update stands), "carried"
or "parked" (a late update carried into a newer round, now or when one opens), or the dead-letter
reason. Cases under the "carry" late policy are the service's alone: the simulator has no late updates.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from shared import codec
from shared.bits import pack, unpack
from shared.errors import CodecError
from shared.models import build_model
from shared.presets import model_spec
from shared.rounds import DeviceRecord, RoundState, receive_update
from shared.structures import random_structure, structure_rule
from shared.transport import Envelope

SPEC = model_spec("digits", width=4, seed=0)  # 312 mask bits: small, but a real model's fingerprint
ENROLLED = ("a", "b", "c")


@dataclass(frozen=True)
class Round:
    id: int
    state: str = "open"  # open | closing | closed
    sampled: tuple[str, ...] = ("a", "b")
    delivered: tuple[str, ...] = ()  # devices whose own update for this round is already stored
    carried: tuple[str, ...] = ()  # devices whose update of round id - 1 was carried into this one (carry)


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    device: str = "a"  # the device the update names
    round: int = 3  # the round it names
    user: str | None = None  # the broker-verified sender; None: the device itself
    key: str | None = None  # the routing key; None: device.<device>.update
    rounds: tuple[Round, ...] = (Round(3),)
    model: str | None = None  # None: the aggregator's fingerprint
    layout: str | None = None  # None: the aggregator's layout hash
    short_by: int = 0  # structure bits missing from the update
    version: int = 0  # the mask version the update says it trained from
    variant: int = 0  # which bits it carries (0: the same bits as the update `delivered` stored)
    late: str = "drop"  # the rounds' late-update policy

    @property
    def service_only(self) -> bool:
        return self.late != "drop"


CLOSED_2 = Round(2, "closed", delivered=("b",))  # a sampled, its update missed the round
CASES = (
    Case("sampled device, open round", "stored"),
    Case("device not sampled", "not_sampled", device="c"),
    Case("round never opened", "unknown_round", round=9),
    Case("round closing (quorum or deadline reached)", "round_closed", rounds=(Round(3, "closing"),)),
    Case("round closed", "round_closed", rounds=(Round(3, "closed"),)),
    Case("update of an earlier round that closed", "round_closed", round=2, rounds=(CLOSED_2, Round(3))),
    Case("duplicate: the same update again", "duplicate", rounds=(Round(3, delivered=("a",)),)),
    Case("duplicate: another update of the same device", "duplicate", variant=1,
         rounds=(Round(3, delivered=("a",)),)),
    Case("duplicate after the round closed (a redelivery)", "duplicate",
         rounds=(Round(3, "closed", delivered=("a",)),)),
    Case("device not sampled, round closed", "not_sampled", device="c", rounds=(Round(3, "closed"),)),
    Case("device never said hello", "unknown_device", device="z"),
    Case("device never said hello, round never opened", "unknown_device", device="z", round=9),
    Case("wrong bit count", "bad_length", short_by=1),
    Case("wrong bit count from a device not sampled", "bad_length", device="c", short_by=1),
    Case("wrong bit count, duplicate", "bad_length", short_by=1, rounds=(Round(3, delivered=("a",)),)),
    Case("spoofed: b's connection names a", "spoofed_device", user="b", key="device.b.update"),
    Case("routing key of another device", "routing_mismatch", key="device.b.update"),
    Case("routing key of another type", "routing_mismatch", key="device.a.hello"),
    Case("other model", "wrong_model", model="c" * 32),
    Case("other layout", "wrong_layout", layout="c" * 32),
    # Neither path checks the version an update trained from: a board restored from an older mask,
    # or a carried late update, legitimately trains from an older one.
    Case("trained from another mask version", "stored", version=7),
    # The "carry" late policy (service only), max_staleness 1.
    Case("late update carried into the open round", "carried", round=2, late="carry",
         rounds=(CLOSED_2, Round(3, sampled=("b", "c")))),
    Case("carried late update again (a redelivery)", "duplicate", round=2, late="carry",
         rounds=(CLOSED_2, Round(3, sampled=("b", "c"), carried=("a",)))),
    Case("late update, its device sampled again", "round_closed", round=2, late="carry",
         rounds=(CLOSED_2, Round(3))),
    Case("late update, its device sampled again and delivered", "round_closed", round=2, late="carry",
         rounds=(CLOSED_2, Round(3, delivered=("a",)))),
    Case("late update, no newer round yet", "parked", round=2, late="carry", rounds=(CLOSED_2,)),
    Case("late update too stale to carry", "round_closed", round=1, late="carry",
         rounds=(Round(1, "closed", delivered=("b",)), Round(2, "closed", ("b", "c")), Round(3, sampled=("b", "c")))),
    Case("late update of a device the closed round did not sample", "not_sampled", device="c", round=2,
         late="carry", rounds=(CLOSED_2, Round(3))),
    Case("own update for the round a late update was carried into", "not_sampled", late="carry",
         rounds=(CLOSED_2, Round(3, sampled=("b", "c"), carried=("a",)))),
)
SIMULATED = tuple(c for c in CASES if not c.service_only)


@dataclass(frozen=True)
class Model:
    fingerprint: str
    layout: str
    nbits: int


def model() -> Model:
    net = build_model(SPEC)
    return Model(net.fingerprint(), net.layout_hash(), net.nbits)


def structure(device: str, nbits: int) -> np.ndarray:
    """Device's structure S_i (bool, nbits): fixed per device name, one that pruning can produce
    (the unpruned layers whole, 20% of each of the last two layers), as the aggregator insists."""
    rule = structure_rule(build_model(SPEC), last_k=2, rho=0.2)
    assert rule.nbits == nbits
    return unpack(random_structure(rule, np.random.default_rng(zlib.crc32(device.encode()))), nbits)


def hello(device: str, m: Model) -> bytes:
    return codec.encode(codec.make_hello(device=device, round=0, model=m.fingerprint, layout=m.layout,
                                         structure=structure(device, m.nbits)))


def update(device: str, round_id: int, m: Model, *, variant: int = 0, version: int = 0, short_by: int = 0,
           model: str | None = None, layout: str | None = None) -> bytes:
    inside = int(structure(device, m.nbits).sum()) - short_by
    bits = (np.arange(inside) + variant) % 3 == 0
    return codec.encode(codec.make_update(device=device, round=round_id, model=model or m.fingerprint,
                                          layout=layout or m.layout, bits=bits, version=version))


def delivery(case: Case, m: Model) -> tuple[str, str, bytes]:
    """The case's update as the aggregator receives it: (routing key, broker user, body)."""
    body = update(case.device, case.round, m, variant=case.variant, version=case.version,
                  short_by=case.short_by, model=case.model, layout=case.layout)
    return case.key or f"device.{case.device}.update", case.user or case.device, body


@dataclass(frozen=True)
class Result:
    outcome: str
    received: dict[int, list[str]]  # round -> devices whose own update it holds, after the case


def simulated(case: Case, m: Model) -> Result:
    """The case through the simulator's path (shared.rounds.receive_update)."""
    assert not case.service_only, f"{case.name}: the simulator has no late-update policy"
    records = {d: DeviceRecord(structure=pack(structure(d, m.nbits))) for d in ENROLLED}
    rounds: dict[int, RoundState] = {}
    for r in case.rounds:
        rnd = rounds[r.id] = RoundState(round_id=r.id, sampled=list(r.sampled), deadline=math.inf,
                                        quorum=len(r.sampled))
        for d in r.delivered:
            assert _receive(f"device.{d}.update", d, update(d, r.id, m), m, rnd, records) == "stored"
        rnd.state = r.state
    key, user, body = delivery(case, m)
    try:
        outcome = _receive(key, user, body, m, rounds.get(case.round), records)
    except CodecError as err:
        outcome = err.reason
    return Result(outcome, {r: sorted(rnd.received) for r, rnd in rounds.items()})


def _receive(key: str, user: str, body: bytes, m: Model, rnd: RoundState | None,
             records: dict[str, DeviceRecord]) -> str:
    msg = codec.decode(body, expect_type="update")
    return receive_update(Envelope(key, user, body), msg, fingerprint=m.fingerprint, layout=m.layout,
                          nbits=m.nbits, rnd=rnd, records=records)
