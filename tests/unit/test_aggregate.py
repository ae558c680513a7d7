"""Merge kernel vs. the per-element reference, the merge rule on hand-made cases, bit helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.bench.merge_kernel import run_aggregate_bench
from shared import bits, merge_jit
from shared.aggregate import merge_masks, merge_masks_reference, vote_counts

# Both kernels: the numba one (the default: numba is a dependency) and the numpy fallback.
KERNELS = [True, False]


def packed(rows: list[list[int]]) -> np.ndarray:
    """Pack a list of 0/1 rows (all the same length) into a (n, nbytes) uint8 array."""
    return np.packbits(np.array(rows, dtype=np.bool_), axis=1)


def merged_bits(structures: list[list[int]], masks: list[list[int]], **kw: object) -> list[list[int]]:
    """Run merge_masks on 0/1 rows and unpack the result; also check it against the reference."""
    nbits = len(structures[0])
    s, m = packed(structures), packed(masks)
    out = merge_masks(s, m, nbits, **kw)  # type: ignore[arg-type]
    assert np.array_equal(out, merge_masks_reference(s, m, nbits, **kw))  # type: ignore[arg-type]
    return np.unpackbits(out, axis=1, count=nbits).tolist()  # type: ignore[no-any-return]


@st.composite
def merge_inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, int, int]:
    n = draw(st.integers(1, 12))
    nbits = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    keep_p, ones_p = draw(st.floats(0, 1)), draw(st.floats(0, 1))
    s = rng.random((n, nbits)) < keep_p
    m = s & (rng.random((n, nbits)) < ones_p)
    region = None if draw(st.booleans()) else np.packbits(rng.random(nbits) < draw(st.floats(0, 1)))
    min_voters = draw(st.integers(1, 4))
    block_bytes = draw(st.sampled_from([8, 16, 24, 64, 1 << 16]))  # many blocks and ragged tails
    return np.packbits(s, axis=1), np.packbits(m, axis=1), nbits, region, min_voters, block_bytes


@settings(max_examples=300, deadline=None)
@given(merge_inputs(), st.sampled_from(KERNELS))
def test_kernel_matches_reference(
    case: tuple[np.ndarray, np.ndarray, int, np.ndarray | None, int, int], compiled: bool
) -> None:
    s, m, nbits, region, min_voters, block_bytes = case
    expected = merge_masks_reference(s, m, nbits, vote_region=region, min_voters=min_voters)
    got = merge_masks(s, m, nbits, vote_region=region, min_voters=min_voters, block_bytes=block_bytes,
                      compiled=compiled)
    assert got.dtype == np.uint8 and got.shape == s.shape
    assert np.array_equal(got, expected)
    # Never a 1 outside a device's structure, and the padding bits stay 0.
    assert not np.any(got & ~s)
    assert np.array_equal(got, np.packbits(np.unpackbits(got, axis=1, count=nbits), axis=1))
    narrow = merge_masks_reference(s, m, nbits, vote_region=region, min_voters=min_voters, count_dtype=np.uint16)
    assert np.array_equal(narrow, expected)  # the benchmark's "tuned naive" row


@pytest.mark.parametrize("compiled", KERNELS)
@pytest.mark.parametrize("n", [2, 3, 20, 64, 300])
def test_kernel_matches_reference_many_devices(n: int, compiled: bool) -> None:
    rng = np.random.default_rng(n)
    nbits = 64 * 37 + 5
    s = rng.random((n, nbits)) < 0.7
    m = s & (rng.random((n, nbits)) < 0.5)
    s_p, m_p = np.packbits(s, axis=1), np.packbits(m, axis=1)
    for min_voters in (1, 2, n // 2 + 1, n, n + 1):
        expected = merge_masks_reference(s_p, m_p, nbits, min_voters=min_voters)
        got = merge_masks(s_p, m_p, nbits, min_voters=min_voters, block_bytes=128, compiled=compiled)
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("compiled", KERNELS)
def test_unaligned_inputs(compiled: bool) -> None:
    rng = np.random.default_rng(7)
    n, nbits = 5, 64 * 3_000 + 3  # many blocks at block_bytes=512, with a ragged tail
    big_s = np.packbits(rng.random((n, nbits + 8)) < 0.6, axis=1)
    s = big_s[:, 1:]  # misaligned, non-contiguous view
    m = s & np.packbits(rng.random((n, nbits)) < 0.5, axis=1)
    region = np.packbits(rng.random(nbits) < 0.8)
    expected = merge_masks_reference(s, m, nbits, vote_region=region)
    for block_bytes in (512, 1 << 16):
        got = merge_masks(s, m, nbits, vote_region=region, block_bytes=block_bytes, compiled=compiled)
        assert np.array_equal(got, expected)


def test_numba_kernel_is_the_default_for_large_merges() -> None:
    # numba is the `fast` extra, which make setup installs: without it merges fall back to the numpy
    # kernel, 2-3x slower at 20 devices x 15M parameters (docs/results.md, "Against memory bandwidth").
    assert merge_jit.AVAILABLE
    assert merge_jit.pays(20 * 15_000_000 // 8) and not merge_jit.pays(20 * 1_000_000 // 8)


# ---------------------------------------------------------------- the rule, by hand


def test_majority_wins_among_voters() -> None:
    s = [[1, 1], [1, 1], [1, 1]]
    assert merged_bits(s, [[1, 0], [1, 0], [0, 1]]) == [[1, 0], [1, 0], [1, 0]]


def test_tie_keeps_own_bit() -> None:
    s = [[1, 1], [1, 1]]
    assert merged_bits(s, [[1, 0], [0, 1]]) == [[1, 0], [0, 1]]


def test_element_in_one_structure_keeps_own_bit() -> None:
    s = [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    m = [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert merged_bits(s, m) == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_outside_structure_is_zero_even_when_majority_is_one() -> None:
    s = [[1, 1], [1, 1], [0, 1]]
    m = [[1, 1], [1, 1], [0, 0]]
    assert merged_bits(s, m) == [[1, 1], [1, 1], [0, 1]]


def test_voters_are_only_devices_keeping_the_element() -> None:
    # Devices 2 and 3 pruned element 0: the two remaining voters agree on 1.
    s = [[1], [1], [0], [0]]
    m = [[1], [1], [0], [0]]
    assert merged_bits(s, m) == [[1], [1], [0], [0]]


def test_vote_region_excludes_voting() -> None:
    s = [[1, 1], [1, 1], [1, 1]]
    m = [[1, 1], [1, 1], [0, 0]]
    region = np.packbits(np.array([True, False]))
    assert merged_bits(s, m, vote_region=region) == [[1, 1], [1, 1], [1, 0]]


def test_min_voters() -> None:
    s = [[1], [1], [1], [0]]
    m = [[1], [1], [0], [0]]
    assert merged_bits(s, m, min_voters=3) == [[1], [1], [1], [0]]
    assert merged_bits(s, m, min_voters=4) == [[1], [1], [0], [0]]


def test_single_device_keeps_its_mask() -> None:
    assert merged_bits([[1, 1, 0]], [[0, 1, 0]], min_voters=1) == [[0, 1, 0]]


def test_vote_counts() -> None:
    voters, ones = vote_counts(packed([[1, 1, 0], [1, 0, 0]]), packed([[1, 0, 0], [0, 0, 0]]), 3)
    assert voters.dtype == np.uint16 and voters.tolist() == [2, 1, 0]
    assert ones.tolist() == [1, 0, 0]


# ---------------------------------------------------------------- validation


def test_mask_outside_structure_names_the_row() -> None:
    s, m = packed([[1, 1], [1, 0], [1, 1]]), packed([[1, 0], [0, 1], [0, 0]])
    for fn in (merge_masks, merge_masks_reference):
        with pytest.raises(ValueError, match=r"masks\[1\]"):
            fn(s, m, 2)
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        merge_masks(s, m, 2, compiled=False)
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        merge_masks(s, m, 2, min_voters=5)  # the no-vote shortcut validates too


@pytest.mark.parametrize("compiled", KERNELS)
def test_first_bad_row_is_named_whichever_block_shows_it(compiled: bool) -> None:
    # Row 3 goes wrong in an early block, row 1 only in the last one (16-byte blocks): row 1 is named.
    n, nbits = 5, 64 * 40
    s = np.packbits(np.ones((n, nbits), dtype=np.bool_), axis=1)
    s[3, 20], s[1, -1] = 0, 0
    m = s.copy()
    m[3, 20], m[1, -1] = 1, 1
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        merge_masks(s, m, nbits, block_bytes=16, compiled=compiled)


@pytest.mark.parametrize(
    ("structures", "masks", "nbits", "kwargs"),
    [
        (np.zeros((2, 2), np.uint8), np.zeros((3, 2), np.uint8), 16, {}),  # shapes differ
        (np.zeros((0, 2), np.uint8), np.zeros((0, 2), np.uint8), 16, {}),  # no participants
        (np.zeros((2, 2), np.uint16), np.zeros((2, 2), np.uint16), 16, {}),  # dtype
        (np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.uint8), 16, {}),  # nbytes != ceil(nbits/8)
        (np.zeros(2, np.uint8), np.zeros(2, np.uint8), 16, {}),  # not 2-D
        (np.full((2, 2), 1, np.uint8), np.zeros((2, 2), np.uint8), 15, {}),  # padding bit set
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 16, {"min_voters": 0}),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 16, {"vote_region": np.zeros(3, np.uint8)}),
    ],
)
def test_bad_inputs_raise(structures: np.ndarray, masks: np.ndarray, nbits: int, kwargs: dict[str, object]) -> None:
    for fn in (merge_masks, merge_masks_reference):
        with pytest.raises(ValueError):
            fn(structures, masks, nbits, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- bit helpers


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=200), st.integers(0, 2**32 - 1))
def test_pack_unpack_select_scatter_round_trip(raw: list[bool], seed: int) -> None:
    vec = np.array(raw, dtype=np.bool_)
    nbits = vec.size
    p = bits.pack(vec)
    assert p.size == (nbits + 7) // 8
    assert np.array_equal(bits.unpack(p, nbits), vec)
    assert bits.popcount(p) == int(vec.sum())
    structure = np.random.default_rng(seed).random(nbits) < 0.5
    s = bits.pack(structure)
    mask = bits.pack(vec & structure)
    inner = bits.select(mask, s, nbits)
    assert inner.size == (int(structure.sum()) + 7) // 8
    assert np.array_equal(bits.unpack(inner, int(structure.sum())), vec[structure])
    assert np.array_equal(bits.scatter(inner, s, nbits), mask)
    where = bits.positions(s, nbits)  # the cached fast path gives the same bits
    assert np.array_equal(bits.select_at(mask, where, nbits), inner)
    assert np.array_equal(bits.scatter_at(inner, where, nbits), mask)


def test_popcount_without_bitwise_count(monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.arange(1000, dtype=np.int64).astype(np.uint8).reshape(10, 100)
    expected = int(np.unpackbits(data).sum())
    assert bits.popcount(data) == expected
    monkeypatch.setattr(bits, "_HAS_BITWISE_COUNT", False)
    assert bits.popcount(data) == expected


def test_pack_accepts_uint8_and_rejects_other_values() -> None:
    assert bits.pack(np.array([1, 0, 1], dtype=np.uint8)).tolist() == [0b10100000]
    with pytest.raises(ValueError):
        bits.pack(np.array([2, 0], dtype=np.uint8))


def test_bit_helpers_validate_lengths() -> None:
    with pytest.raises(ValueError, match="expected"):
        bits.unpack(np.zeros(3, np.uint8), 9)
    with pytest.raises(ValueError, match="padding"):
        bits.unpack(np.array([0xFF], np.uint8), 4)
    s = bits.pack(np.array([1, 0, 1, 1], dtype=np.bool_))
    with pytest.raises(ValueError):
        bits.scatter(np.zeros(2, np.uint8), s, 4)  # 3 kept bits fit in 1 byte, not 2
    with pytest.raises(ValueError):
        bits.select(np.zeros(2, np.uint8), s, 4)


# ---------------------------------------------------------------- benchmark


def test_small_bench_is_identical() -> None:
    result = run_aggregate_bench(devices=4, params=100_000, repeats=1)
    assert result["identical"] is True
    assert isinstance(result["speedup"], float) and result["speedup"] > 0
    assert result["devices"] == 4 and result["params"] == 100_000
    for key in ("kernel_seconds", "numpy_kernel_seconds", "read_pass_seconds", "read_write_pass_seconds"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["kernel_over_read_pass"] == result["kernel_seconds"] / result["read_pass_seconds"]
