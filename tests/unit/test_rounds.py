"""Round logic and merge rules: validation reasons, sampling, structure safety."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.bits import pack, popcount, unpack
from shared.errors import CodecError
from shared.merge_rules import RULES, MergeContext, get_rule
from shared.rounds import (
    DeviceRecord,
    RoundState,
    mask_message,
    quorum_count,
    sample_count,
    sample_devices,
    validate_update,
)
from shared.transport import Envelope

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


@pytest.mark.parametrize(
    "case,reason",
    [
        ("spoof", "spoofed_device"),
        ("model", "wrong_model"),
        ("layout", "wrong_layout"),
        ("unknown", "unknown_device"),
        ("round", "unknown_round"),
        ("closed", "round_closed"),
        ("not_sampled", "not_sampled"),
        ("duplicate", "duplicate"),
        ("length", "bad_length"),
    ],
)
def test_every_rejection_has_its_reason(case: str, reason: str) -> None:
    records = {"a": _record(1), "b": _record(2), "c": _record(3)}
    rnd = RoundState(round_id=3, sampled=["a", "b"], deadline=0, quorum=2)
    dev, user, msg = "a", "a", _update("a", records["a"])
    if case == "spoof":
        user = "b"
    elif case == "model":
        msg = _update("a", records["a"], model="c" * 32)
    elif case == "layout":
        msg = _update("a", records["a"], layout="c" * 32)
    elif case == "unknown":
        dev = user = "z"
        msg = _update("z", records["a"])
    elif case == "round":
        msg = _update("a", records["a"], round_id=9)
    elif case == "closed":
        rnd.state = "closing"
    elif case == "not_sampled":
        dev = user = "c"
        msg = _update("c", records["c"])
    elif case == "duplicate":
        rnd.received["a"] = np.zeros(7, np.uint8)
    elif case == "length":
        msg = codec.make_update(device="a", round=3, model=FP, layout=LAYOUT, bits=np.ones(3, bool), version=0)
    env = Envelope(f"device.{dev}.update", user, codec.encode(msg))
    with pytest.raises(CodecError) as err:
        validate_update(env, msg, fingerprint=FP, layout=LAYOUT, nbits=NBITS, rnd=rnd, records=records)
    assert err.value.reason == reason


def test_valid_update_scatters_into_structure() -> None:
    records = {"a": _record(1)}
    rnd = RoundState(round_id=3, sampled=["a"], deadline=0, quorum=1)
    msg = _update("a", records["a"])
    full = validate_update(Envelope("device.a.update", "a", b""), msg, fingerprint=FP, layout=LAYOUT,
                           nbits=NBITS, rnd=rnd, records=records)
    assert np.array_equal(full, records["a"].structure)  # all ones inside = the structure itself


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
