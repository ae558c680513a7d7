"""Every merge rule on one small hand-made round, with each device's merged bits worked out by hand.

Five devices A..E, 16 elements: 0-9 are the body, 10-15 the pruned (head) region. Bits are written
"body head", element 0 first. What each element tests (voters = devices whose structure holds it):

   e0  all 5 vote, 4 ones : majority 1, and 4/5 >= 0.8 (consensus flips E to 1)
   e1  all 5 vote, 3 ones : majority 1, but 3/5 < 0.8 (consensus keeps own bits)
   e2  all 5 vote, 1 one  : majority 0, and 4/5 zeros (consensus flips E to 0)
   e3  A-D vote, 2 ones   : tie, everyone keeps its own bit
   e4  A alone, a 1       : single voter keeps its own bit
   e5  B alone, a 0       : single voter keeps its own bit
   e6  nobody             : 0 for everyone
   e7  A-C vote, 2 ones   : majority 1 (C flips to 1)
   e8  D, E vote, 1 one   : tie between two
   e9  all 5, all zeros   : 0
  e10  A-C, 1 one         : majority 0 (A flips to 0)
  e11  A-C, all ones      : 1
  e12  A, B, C, E, 2 ones : tie overall; within A-C 2 of 3 (affinity flips C to 1; E votes alone there)
  e13  A, B, D, E, 3 ones : majority 1 (B flips); within A, B a tie (affinity keeps B's 0)
  e14  C, D, E, 1 one     : majority 0 (C flips); C is alone in its affinity group (keeps its 1)
  e15  D, E, 1 one        : tie between two

The head structures make two affinity groups at min_jaccard 0.5: A, B, C (A = B = {10-13},
C = {10, 11, 12, 14}: Jaccard 3/5 with A and B) and D, E (D = {13, 14, 15}, E = {12-15}: 3/4);
across the groups the Jaccard is at most 1/3.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.bits import pack, unpack
from shared.merge_rules import RULES, ConsensusRule, MergeContext, MergeRule, get_rule

NBITS = 16
DEVICES = "ABCDE"
REGION = "0000000000 111111"

STRUCTURES = {
    "A": "1111100101 111100",
    "B": "1111010101 111100",
    "C": "1111000101 111010",
    "D": "1111000011 000111",
    "E": "1110000011 001111",
}
MASKS = {
    "A": "1101100100 111100",
    "B": "1101000100 011000",
    "C": "1100000000 010010",
    "D": "1000000010 000100",
    "E": "0010000000 000101",
}
# Majority of each element's voters everywhere; a tie or a single voter keeps the device's own bit.
PAPER = {
    "A": "1101100100 011100",
    "B": "1101000100 011100",
    "C": "1100000100 010000",
    "D": "1100000010 000100",
    "E": "1100000000 000101",
}
EXPECTED = {
    "paper": PAPER,
    # The body as paper; the head as each device's own mask.
    "body": {
        "A": "1101100100 111100",
        "B": "1101000100 011000",
        "C": "1100000100 010010",
        "D": "1100000010 000100",
        "E": "1100000000 000101",
    },
    # The body as each device's own mask; the head as paper.
    "head": {
        "A": "1101100100 011100",
        "B": "1101000100 011100",
        "C": "1100000000 010000",
        "D": "1000000010 000100",
        "E": "0010000000 000101",
    },
    # The body as paper; in the head each device votes only within its group (A-C or D-E).
    "affinity": {
        "A": "1101100100 011100",
        "B": "1101000100 011000",
        "C": "1100000100 011010",
        "D": "1100000010 000100",
        "E": "1100000000 000101",
    },
    # q = 0.8: only e0 (4 of 5 ones) and e2 (4 of 5 zeros) reach the supermajority; both change E.
    "consensus": {
        "A": "1101100100 111100",
        "B": "1101000100 011000",
        "C": "1100000000 010010",
        "D": "1000000010 000100",
        "E": "1000000000 000101",
    },
    "local": MASKS,
    # tolerate 1: a bit changes only where the head vote leads by 3 or more; only e11 (3 ones of 3)
    # does, and every voter already holds its 1. Larger votes: tests/unit/test_robust_merge.py.
    "robust": MASKS,
    # Bits view of theta = (ones + 1) / (holders + 2) > 1/2: a strict majority gives 1, a single
    # voter keeps its bit, but a tie (e3, e8, e12, e15) gives 1/2, which is not above it: 0.
    "agreement": {
        "A": "1100100100 010100",
        "B": "1100000100 010100",
        "C": "1100000100 010000",
        "D": "1100000000 000100",
        "E": "1100000000 000100",
    },
}


def bits(text: str) -> np.ndarray:
    return pack(np.array([c == "1" for c in text.replace(" ", "")]))


def text(packed: np.ndarray) -> str:
    s = "".join("1" if b else "0" for b in unpack(packed, NBITS))
    return f"{s[:10]} {s[10:]}"


def merged(rule: MergeRule, devices: str = DEVICES) -> dict[str, str]:
    structures = np.stack([bits(STRUCTURES[d]) for d in devices])
    masks = np.stack([bits(MASKS[d]) for d in devices])
    out = rule.merge(structures, masks, MergeContext(nbits=NBITS, pruned_region=bits(REGION)))
    return {d: text(row) for d, row in zip(devices, out, strict=True)}


def test_the_hand_made_round_is_well_formed() -> None:
    for d in DEVICES:
        s, m = unpack(bits(STRUCTURES[d]), NBITS), unpack(bits(MASKS[d]), NBITS)
        assert not (m & ~s).any(), f"{d}'s mask leaves its structure"


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_every_rule_by_hand(rule: str) -> None:
    assert merged(get_rule(rule)) == EXPECTED[rule]


def test_every_rule_has_a_hand_made_case() -> None:
    assert set(EXPECTED) == set(RULES)


@pytest.mark.parametrize("q", [0.5, 0.4, 0.3])
def test_consensus_at_or_below_half_is_the_majority_and_a_tie_keeps_the_own_bit(q: float) -> None:
    """With q <= 0.5 a tie (e3, e8, e12, e15) meets both supermajorities; it used to give every
    voter a 1. Now a tie keeps the device's own bit and otherwise the majority wins: the paper rule."""
    assert merged(ConsensusRule(q=q)) == PAPER


def test_consensus_between_half_and_the_default() -> None:
    # q = 0.6: 3 of 5 (e1), 2 of 3 (e7, e10, e14) and 3 of 4 (e13) now suffice; ties still keep own bits.
    assert merged(ConsensusRule(q=0.6)) == PAPER
    # q = 0.7: 2 of 3 (0.67) no longer does, 3 of 4 (0.75) still does (e13 flips B to 1).
    assert merged(ConsensusRule(q=0.7)) == {
        "A": "1101100100 111100",
        "B": "1101000100 011100",
        "C": "1100000000 010010",
        "D": "1000000010 000100",
        "E": "1000000000 000101",
    }


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_lone_participant_keeps_its_mask(rule: str) -> None:
    assert merged(get_rule(rule), "C") == {"C": MASKS["C"]}


@pytest.mark.parametrize("rule", sorted(set(RULES) - {"agreement"}))
def test_two_participants_only_agree_or_keep_their_own(rule: str) -> None:
    """Between two voters every disagreement is a tie: no bit rule changes a bit of D or E.
    (agreement sends theta = 1/2 on a tie, not a bit; its bits view rounds that to 0, see above.)"""
    assert merged(get_rule(rule), "DE") == {"D": MASKS["D"], "E": MASKS["E"]}


def test_agreement_theta_and_its_4_bit_levels_by_hand() -> None:
    from shared.agreement import dequantize, pack_levels, quantize, unpack_levels
    from shared.merge_rules import AgreementRule

    structures = np.stack([bits(STRUCTURES[d]) for d in DEVICES])
    masks = np.stack([bits(MASKS[d]) for d in DEVICES])
    theta = AgreementRule().theta(structures, masks, MergeContext(nbits=NBITS, pruned_region=bits(REGION)))
    # (ones + 1) / (holders + 2) per element, from the table in the module docstring.
    by_hand = [5 / 7, 4 / 7, 2 / 7, 3 / 6, 2 / 3, 1 / 3, 1 / 2, 3 / 5, 2 / 4, 1 / 7,
               2 / 5, 4 / 5, 3 / 6, 4 / 6, 2 / 5, 2 / 4]
    assert np.allclose(theta, by_hand)
    levels = quantize(theta)
    assert levels.tolist() == [11, 9, 4, 8, 10, 5, 8, 9, 8, 2, 6, 12, 8, 10, 6, 8]  # rint(15 theta), halves to even
    packed, n = pack_levels(levels[:15])  # an odd count: the last byte's low nibble is padding
    assert n == 60 and len(packed) == 8 and packed[-1] & 0x0F == 0
    assert unpack_levels(packed, 15).tolist() == levels[:15].tolist()
    assert np.abs(dequantize(levels) - theta).max() <= 0.5 / 15 + 1e-6
