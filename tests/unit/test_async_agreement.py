"""The async buffer under the agreement rule (shared/async_buffer.py): a flush carries theta over the
buffered updates and the fresh-enough others; "constant" is AgreementRule.theta over those voters bit
for bit, "sqrt" counts each voter's ones and holders s(tau) times."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.agreement import dequantize, quantize, unpack_levels
from shared.async_buffer import AsyncBuffer, Held, check_weighting, merge_buffered, staleness_weight, weighted_theta
from shared.merge_rules import AgreementRule, MergeContext, get_rule
from shared.rounds import DeviceRecord, agreement_message
from tests.random_fleet import random_fleet

RULE = AgreementRule()




def _dense_theta(s: np.ndarray, m: np.ndarray, w: np.ndarray, nbits: int) -> np.ndarray:
    """The formula written out on unpacked bits, in float64: the oracle for the weighted path."""
    su = np.unpackbits(s, axis=1, count=nbits).astype(np.float64)
    mu = np.unpackbits(m, axis=1, count=nbits).astype(np.float64)
    return (w @ mu + 1.0) / (w @ su + 2.0)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("n", "nbits", "seed"), [(1, 9, 0), (5, 203, 1), (40, 1001, 2)])
def test_unit_weights_are_agreement_theta_bit_for_bit(n: int, nbits: int, seed: int) -> None:
    s, m, ctx = random_fleet(n, nbits, seed, ones=0.4)
    got = weighted_theta(s, m, np.ones(n), nbits)
    want = RULE.theta(s, m, ctx)
    assert got.dtype == want.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_weighted_theta_is_the_formula_and_a_stale_vote_counts_less() -> None:
    s, m, _ = random_fleet(6, 120, seed=3, ones=0.4)
    w = np.array([staleness_weight("sqrt", tau) for tau in (0, 1, 3, 8, 0, 24)])
    got = weighted_theta(s, m, w, 120)
    assert np.allclose(got, _dense_theta(s, m, w, 120), rtol=0, atol=1e-7)
    # One holder whose sample is 1: fresh it pulls theta to 2/3; at tau 3 (weight 1/2) only to 1.5/2.5.
    one = np.packbits(np.ones((1, 8), dtype=bool), axis=1)
    fresh, stale = (weighted_theta(one, one, np.array([staleness_weight("sqrt", t)]), 8) for t in (0, 3))
    assert np.allclose(fresh, 2 / 3) and np.allclose(stale, 0.6) and (stale < fresh).all()


def test_elements_nobody_holds_keep_the_prior_and_bad_input_is_refused() -> None:
    s, m, _ = random_fleet(3, 64, seed=4, ones=0.4)
    s[:, :2] = 0  # the first 16 elements: no holder
    m &= s
    theta = weighted_theta(s, m, np.array([1.0, 0.5, 0.25]), 64)
    assert (theta[:16] == np.float32(0.5)).all()
    bad = m.copy()
    bad[0, 0] = 0x80  # a sample bit outside its structure
    with pytest.raises(ValueError, match="outside"):
        weighted_theta(s, bad, np.ones(3), 64)
    with pytest.raises(ValueError):
        weighted_theta(s, m, np.ones(2), 64)


def _state(n: int, nbits: int, bases: list[int], seed: int) -> tuple[dict[str, Held], dict[str, np.ndarray],
                                                                      MergeContext]:
    s, m, ctx = random_fleet(n, nbits, seed, ones=0.4)
    latest = {f"d{i}": Held(m[i], bases[i], f"u{i}") for i in range(n)}
    return latest, {f"d{i}": s[i] for i in range(n)}, ctx


def test_a_constant_flush_is_agreement_theta_over_the_buffered_and_fresh_voters() -> None:
    # Version 6, max staleness 3: d2 and d4 are buffered (d4 at tau 6: its own update still votes),
    # d0 (tau 1) and d3 (tau 3) are fresh others, d1 (tau 5) is too stale to vote.
    latest, structures, ctx = _state(5, 301, [5, 1, 4, 3, 0], seed=5)
    out = merge_buffered(RULE, ctx, 6, latest, ["d2", "d4"], structures, 3, "constant")
    voters = ["d2", "d4", "d0", "d3"]
    want = RULE.theta(np.stack([structures[d] for d in voters]), np.stack([latest[d].mask for d in voters]), ctx)
    assert out.theta is not None and out.theta.tobytes() == want.tobytes()
    assert out.masks == {} and out.boards == ["d2", "d4"] and out.taus == {"d2": 2, "d4": 6}
    assert (out.version, out.voters, out.stale_excluded) == (7, 4, 1)


def test_a_sqrt_flush_weights_each_voter_by_its_staleness() -> None:
    latest, structures, ctx = _state(5, 301, [5, 1, 4, 3, 0], seed=6)
    out = merge_buffered(RULE, ctx, 6, latest, ["d2", "d4"], structures, 3, "sqrt")
    voters = ["d2", "d4", "d0", "d3"]
    w = np.array([staleness_weight("sqrt", 6 - latest[d].base) for d in voters])
    s, m = np.stack([structures[d] for d in voters]), np.stack([latest[d].mask for d in voters])
    assert out.theta is not None
    assert out.theta.tobytes() == weighted_theta(s, m, w, ctx.nbits).tobytes()
    assert np.allclose(out.theta, _dense_theta(s, m, w, ctx.nbits), rtol=0, atol=1e-7)
    assert not np.array_equal(out.theta, RULE.theta(s, m, ctx))  # the weights changed something
    # Every voter fresh (tau 0): weight 1 each, so sqrt is the constant flush bit for bit.
    same = {d: Held(h.mask, 6, h.update_id) for d, h in latest.items()}
    a, b = (merge_buffered(RULE, ctx, 6, same, ["d2"], structures, 3, k) for k in ("sqrt", "constant"))
    assert a.theta is not None and b.theta is not None and a.theta.tobytes() == b.theta.tobytes()


def test_the_buffer_counts_agreement_flushes_like_mask_flushes() -> None:
    s, m, ctx = random_fleet(4, 80, seed=7, ones=0.4)
    structures = {f"d{i}": s[i] for i in range(4)}
    buf = AsyncBuffer(k=3, max_staleness=10, staleness="sqrt")
    assert buf.store("d0", m[0], 0, "a") == "stored"
    assert buf.store("d0", m[0], 0, "a") == "duplicate"
    assert buf.store("d0", m[0], 0, "b") == "replaced"
    buf.store("d1", m[1], 0, "c")
    out = buf.flush(RULE, ctx, structures)
    assert out.boards == ["d0", "d1"] and out.theta is not None and out.theta.shape == (80,)
    assert buf.counts["merged"] == 2 and buf.counts["flushes"] == 1 and buf.version == 1
    # A bit rule's flush is unchanged: masks, no theta.
    buf.store("d2", m[2], 1, "d")
    bits = buf.flush(get_rule("paper"), ctx, structures)
    assert bits.theta is None and list(bits.masks) == bits.boards == ["d2"]


def test_each_buffered_board_gets_theta_inside_its_structure_as_q4() -> None:
    latest, structures, ctx = _state(4, 203, [0, 0, 0, 0], seed=8)
    out = merge_buffered(RULE, ctx, 0, latest, ["d1", "d3"], structures, 5, "sqrt")
    assert out.theta is not None
    for d in out.boards:
        rec = DeviceRecord(structures[d])
        msg = codec.decode(codec.encode(agreement_message(d, out.theta, rec, round_id=out.version, fingerprint="ab" * 8,
                                                          layout="cd" * 8, nbits=ctx.nbits)), expect_type="mask")
        where = rec.where(ctx.nbits)
        assert msg.enc == "q4" and msg.version == out.version and msg.nbits == 4 * len(where)
        levels = unpack_levels(msg.bits or b"", len(where))
        assert np.array_equal(levels, quantize(out.theta[where]))
        assert np.abs(dequantize(levels) - out.theta[where]).max() <= 0.5 / 15 + 1e-6



def test_a_rule_without_a_weighted_vote_is_refused_before_the_first_update() -> None:
    for name in ("paper", "head", "body", "agreement"):
        check_weighting(get_rule(name), "sqrt")
    for name in ("consensus", "robust", "affinity", "local"):
        check_weighting(get_rule(name), "constant")  # any rule, unchanged
        with pytest.raises(ValueError, match="use staleness constant"):
            check_weighting(get_rule(name), "sqrt")
    with pytest.raises(ValueError, match="unknown staleness"):
        check_weighting(RULE, "linear")
