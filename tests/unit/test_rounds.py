"""Round logic: sampling, round membership (the table in tests/membership_cases.py), downlink masks; and
two random-input properties of the merge rules (their hand-made cases are in test_merge_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.bits import pack, popcount, unpack
from shared.merge_rules import RULES, MergeContext, get_rule
from shared.rounds import (
    DeviceRecord,
    RoundState,
    mask_message,
    quorum_count,
    receive_update,
    sample_count,
    sample_devices,
)
from shared.transport import Envelope
from tests import membership_cases as membership

FP, LAYOUT, NBITS = "a" * 32, "b" * 32, 50


def _record(seed: int) -> DeviceRecord:
    rng = np.random.default_rng(seed)
    return DeviceRecord(structure=pack(rng.random(NBITS) < 0.6))


def _update(dev: str, rec: DeviceRecord, round_id: int = 3, **kw: object) -> codec.Message:
    inside = np.ones(rec.inside, dtype=bool)
    args: dict[str, object] = dict(device=dev, round=round_id, model=FP, layout=LAYOUT, bits=inside, version=0)
    args.update(kw)
    return codec.make_update(**args)  # type: ignore[arg-type]


def test_sampling_is_deterministic_and_seeded() -> None:
    pool = [f"d{i}" for i in range(30)]
    a = sample_devices(pool, 6, seed=1, round_id=4)
    assert a == sample_devices(list(reversed(pool)), 6, seed=1, round_id=4)  # order of the pool is irrelevant
    assert len(set(a)) == 6
    assert a != sample_devices(pool, 6, seed=1, round_id=5)
    assert sample_count(100, rate=0.2) == 20
    assert sample_count(100, rate=0.2, over_select=1.3) == 26
    assert sample_count(10, devices=50) == 10
    assert quorum_count(10, 0.7) == 7


@pytest.fixture(scope="module")
def model() -> membership.Model:
    return membership.model()


@pytest.mark.parametrize("case", membership.SIMULATED, ids=lambda c: c.name)
def test_membership_table_through_the_simulators_path(case: membership.Case, model: membership.Model) -> None:
    """The table the service's Lua path is held to as well (tests/integration/test_membership_rules.py)."""
    result = membership.simulated(case, model)
    assert result.outcome == case.expected
    named = next((r for r in case.rounds if r.id == case.round), None)
    if named is not None:  # only a stored update joins the round
        stored = {case.device} if case.expected == "stored" else set()
        assert result.received[named.id] == sorted(set(named.delivered) | stored)


def test_stored_update_scatters_into_structure() -> None:
    records = {"a": _record(1)}
    rnd = RoundState(round_id=3, sampled=["a"], deadline=0, quorum=1)
    msg = _update("a", records["a"])
    status = receive_update(Envelope("device.a.update", "a", b""), msg, fingerprint=FP, layout=LAYOUT,
                            nbits=NBITS, rnd=rnd, records=records)
    assert status == "stored"
    assert np.array_equal(rnd.received["a"], records["a"].structure)  # all ones inside = the structure itself


def test_a_duplicate_keeps_the_first_update() -> None:
    records = {"a": _record(1)}
    rnd = RoundState(round_id=3, sampled=["a"], deadline=0, quorum=1)
    env = Envelope("device.a.update", "a", b"")
    first = codec.make_update(device="a", round=3, model=FP, layout=LAYOUT, bits=np.zeros(records["a"].inside, bool),
                              version=0)
    kw = dict(fingerprint=FP, layout=LAYOUT, nbits=NBITS, rnd=rnd, records=records)
    assert receive_update(env, first, **kw) == "stored"  # type: ignore[arg-type]
    assert receive_update(env, _update("a", records["a"]), **kw) == "duplicate"  # type: ignore[arg-type]
    assert not rnd.received["a"].any()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_rule_puts_a_one_outside_a_structure(rule: str) -> None:
    rng = np.random.default_rng(0)
    n, nbits = 7, 203
    structures = np.stack([pack(rng.random(nbits) < 0.5) for _ in range(n)])
    masks = np.stack([pack(unpack(s, nbits) & (rng.random(nbits) < 0.5)) for s in structures])
    region = pack(np.arange(nbits) >= 120)
    merged = get_rule(rule).merge(structures, masks, MergeContext(nbits=nbits, pruned_region=region))
    assert merged.shape == masks.shape
    assert not (merged & ~structures).any()


def test_body_rule_keeps_pruned_layers_personal() -> None:
    rng = np.random.default_rng(1)
    n, nbits = 5, 160
    structures = np.stack([pack(np.ones(nbits, bool)) for _ in range(n)])
    masks = np.stack([pack(rng.random(nbits) < 0.5) for _ in range(n)])
    region_bits = np.arange(nbits) >= 100
    ctx = MergeContext(nbits=nbits, pruned_region=pack(region_bits))
    merged = get_rule("body").merge(structures, masks, ctx)
    paper = get_rule("paper").merge(structures, masks, ctx)
    for i in range(n):
        own, got = unpack(masks[i], nbits), unpack(merged[i], nbits)
        assert np.array_equal(got[region_bits], own[region_bits])
        assert np.array_equal(got[~region_bits], unpack(paper[i], nbits)[~region_bits])


def test_mask_message_carries_only_structure_bits() -> None:
    rec = _record(4)
    merged = rec.structure.copy()
    msg = mask_message("a", merged, rec, round_id=2, fingerprint=FP, layout=LAYOUT, nbits=NBITS)
    assert msg.nbits == popcount(rec.structure) and msg.version == 2  # version = round id
    assert len(msg.bits or b"") == -(-rec.inside // 8)
