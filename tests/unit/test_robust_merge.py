"""The robust merge rule (shared/merge_rules.py RobustRule): a hand-made round, its relation to the
head rule, and its bound under one Byzantine vote per element, which the plain head vote does not meet."""

from __future__ import annotations

import numpy as np
import pytest

from shared.bits import pack, unpack
from shared.merge_rules import HeadRule, MergeContext, RobustRule, get_rule

# Seven devices, 8 elements; elements 0-5 are the head (voted), 6-7 the body (personal under head).
# lead = ones - zeros among the element's voters (the devices whose structure holds it):
#   e0  A-E 1, F G 0       : lead +3 -> every voter 1
#   e1  E F 1, the rest 0  : lead -3 -> every voter 0
#   e2  A-D 1, E F 0       : lead +2 -> own bits (one liar could have made that lead)
#   e3  A C F G 1, B 0     : lead +3 -> 1 (B flips)
#   e4  A B C 1            : lead +3 -> 1 (already)
#   e5  A 1, B 0           : a tie -> own bits
#   e6  A-F 1, G 0         : the body: own bits under region head; 1 (G flips) under region all
#   e7  nobody             : 0
MASKS = {  # "." outside the structure, else the device's bit
    "A": "1011111.",
    "B": "1010101.",
    "C": "10111.1.",
    "D": "101...1.",
    "E": "110...1.",
    "F": "0101..1.",
    "G": "00.1..0.",
}
ROBUST_HEAD = {
    "A": "10111110",
    "B": "10111010",
    "C": "10111010",
    "D": "10100010",
    "E": "10000010",
    "F": "10010010",
    "G": "10010000",
}
NB = 8
REGION = pack(np.array([True] * 6 + [False] * 2))


def _round(rows: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    s = np.stack([pack(np.array([c != "." for c in r])) for r in rows.values()])
    m = np.stack([pack(np.array([c == "1" for c in r])) for r in rows.values()])
    return s, m


def _text(row: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in unpack(row, NB))


def test_hand_made_round() -> None:
    rows = MASKS
    structures, masks = _round(rows)
    ctx = MergeContext(nbits=NB, pruned_region=REGION)
    out = RobustRule().merge(structures, masks, ctx)
    assert {d: _text(o) for d, o in zip(rows, out, strict=True)} == ROBUST_HEAD
    everywhere = RobustRule(region="all").merge(structures, masks, ctx)
    assert [_text(o)[6] for o in everywhere] == ["1"] * 7  # e6: the body leads 6 to 1, G flips
    assert get_rule("robust") == RobustRule()


def _random_round(rng: np.random.Generator, devices: int, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.random((devices, nbits)) < 0.55
    m = s & (rng.random((devices, nbits)) < 0.5)
    return np.stack([pack(r) for r in s]), np.stack([pack(r) for r in m])


def test_tolerating_no_liar_is_the_head_rule() -> None:
    rng = np.random.default_rng(3)
    region = pack(np.arange(300) >= 100)
    ctx = MergeContext(nbits=300, pruned_region=region)
    for devices in (1, 2, 5, 12):
        s, m = _random_round(rng, devices, 300)
        assert np.array_equal(RobustRule(tolerate=0).merge(s, m, ctx), HeadRule().merge(s, m, ctx))


ATTACKS = ("zeros", "ones", "invert", "against")


def _liar(attack: str, honest_lead: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """The Byzantine board's bits on every element (its structure holds them all)."""
    if attack == "zeros":
        return np.zeros_like(trained)
    if attack == "ones":
        return np.ones_like(trained)
    if attack == "invert":
        return ~trained
    return honest_lead <= 0  # "against": votes against the honest lead, and breaks every honest tie


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("seed", range(3))
def test_one_byzantine_vote_per_element_is_bounded(attack: str, seed: int) -> None:
    """With one lying vote on every element, for every honest device and element:
    - a clear honest majority (|lead| >= 4) gives the clean merge's bit (the plain majority's too);
    - no clear majority (|lead| <= 1) keeps the device's own bit;
    - a bit that changes takes the honest majority's value."""
    rng = np.random.default_rng(seed)
    nbits, honest = 512, 11
    ctx = MergeContext(nbits=nbits, pruned_region=pack(np.ones(nbits, dtype=bool)))
    s, m = _random_round(rng, honest, nbits)
    keep, own = np.stack([unpack(r, nbits) for r in s]), np.stack([unpack(r, nbits) for r in m])
    lead = own.sum(axis=0).astype(int) - (keep & ~own).sum(axis=0).astype(int)
    lie = _liar(attack, lead, rng.random(nbits) < 0.5)
    attacked_s = np.vstack([s, pack(np.ones(nbits, dtype=bool))])
    attacked_m = np.vstack([m, pack(lie)])

    rule = RobustRule(tolerate=1)
    clean = np.stack([unpack(r, nbits) for r in rule.merge(s, m, ctx)])
    plain_clean = np.stack([unpack(r, nbits) for r in HeadRule().merge(s, m, ctx)])
    got = np.stack([unpack(r, nbits) for r in rule.merge(attacked_s, attacked_m, ctx)[:honest]])

    clear = np.abs(lead) >= 4
    unclear = np.abs(lead) <= 1
    assert clear.any() and unclear.any() and (~clear & ~unclear).any()  # every band occurs
    assert np.array_equal(got[:, clear], clean[:, clear])
    assert np.array_equal(got[:, clear], plain_clean[:, clear])
    assert np.array_equal(got[:, unclear], own[:, unclear])
    changed = got != own
    assert np.all(got[changed] == np.broadcast_to(lead > 0, got.shape)[changed])
    assert not (got & ~keep).any()  # never a 1 outside a structure


def test_the_plain_head_vote_is_steered_by_one_liar() -> None:
    """The same check fails for the head rule: one vote breaks honest ties (|lead| <= 1) its way."""
    rng = np.random.default_rng(0)
    nbits, honest = 512, 11
    ctx = MergeContext(nbits=nbits, pruned_region=pack(np.ones(nbits, dtype=bool)))
    s, m = _random_round(rng, honest, nbits)
    keep, own = np.stack([unpack(r, nbits) for r in s]), np.stack([unpack(r, nbits) for r in m])
    lead = own.sum(axis=0).astype(int) - (keep & ~own).sum(axis=0).astype(int)
    out = HeadRule().merge(np.vstack([s, pack(np.ones(nbits, dtype=bool))]),
                           np.vstack([m, pack(lead <= 0)]), ctx)[:honest]
    got = np.stack([unpack(r, nbits) for r in out])
    unclear = np.abs(lead) <= 1
    assert not np.array_equal(got[:, unclear], own[:, unclear])
