"""Shoulder-exercise recognition from seglearn's smartwatch IMU data: one device per subject.

The raw data: 140 recordings (6 channels: accelerometer ax..az and gyroscope wx..wz, 50 Hz) of
10 subjects x 7 exercises, 947..2618 samples each. Every subject has exactly two recordings per
exercise, one per arm (`side` 0/1).

Splits are by recording, never by window: per subject and class one recording (seeded choice)
is held out whole for test, so every class is tested on an unseen recording -- in this data
that is always the *other arm* from the class's training recording. The last 20% of each
remaining recording is validation. The raw signal is cut first and each piece windowed
separately, so no window straddles a split boundary. (A class with a single recording would go
to train; the shipped data has none.)

Because that makes test an arm-transfer problem that validation (same arm as train) cannot see,
`holdout="time"` is offered too: every recording is cut in time into train/val/test 60/20/20, so
all three splits hold both arms and are drawn from the device's own distribution, still with no
window straddling a cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data import DeviceData, FederatedDataset, Split, missing_package
from shared.data.partition import capped_sizes, subsample
from shared.errors import ConfigError

WINDOW = 100  # 2 s at 50 Hz
STRIDE = 50
VAL_FRACTION = 0.2
NUM_CHANNELS = 6
NUM_CLASSES = 7
NUM_SUBJECTS = 10


@dataclass(frozen=True)
class Recording:
    signal: np.ndarray  # (n_samples, 6) float64
    label: int
    subject: int
    side: int


@dataclass(frozen=True)
class Segment:
    """A contiguous stretch `[start, stop)` of one recording assigned to one split."""

    recording: int
    split: str
    start: int
    stop: int


def load_recordings() -> list[Recording]:
    try:
        from seglearn.datasets import load_watch
    except ImportError as exc:
        raise missing_package("seglearn", "seglearn") from exc
    data = load_watch()
    return [
        Recording(np.asarray(sig, dtype=np.float64), int(label), int(subject), int(side))
        for sig, label, subject, side in zip(data["X"], data["y"], data["subject"], data["side"], strict=True)
    ]


TIME_SPLIT = (0.6, 0.8)  # train | val | test boundaries as fractions of each recording


def plan_segments(
    recordings: list[Recording], rng: np.random.Generator, holdout: str = "recording"
) -> list[Segment]:
    """Assign whole recordings to test and the head/tail of the rest to train/val (holdout "recording"),
    or cut every recording in time (holdout "time").

    `recordings` are one subject's; segment indices refer to positions in that list.
    """
    segments: list[Segment] = []
    if holdout == "time":
        for i, r in enumerate(recordings):
            n = len(r.signal)
            a, b = round(n * TIME_SPLIT[0]), round(n * TIME_SPLIT[1])
            segments += [Segment(i, "train", 0, a), Segment(i, "val", a, b), Segment(i, "test", b, n)]
        return segments
    for label in sorted({r.label for r in recordings}):
        members = [i for i, r in enumerate(recordings) if r.label == label]
        test = members[int(rng.integers(len(members)))] if len(members) > 1 else None
        for i in members:
            n = len(recordings[i].signal)
            if i == test:
                segments.append(Segment(i, "test", 0, n))
            else:
                cut = n - round(n * VAL_FRACTION)
                segments += [Segment(i, "train", 0, cut), Segment(i, "val", cut, n)]
    return segments


def window_starts(start: int, stop: int) -> np.ndarray:
    """Starts of every full window inside `[start, stop)`."""
    return np.arange(start, stop - WINDOW + 1, STRIDE, dtype=np.int64)


def build(*, num_devices: int | None, cap: int | None, rng: np.random.Generator,
          holdout: str = "recording") -> FederatedDataset:
    n_dev = NUM_SUBJECTS if num_devices is None else num_devices
    if n_dev > NUM_SUBJECTS:
        raise ConfigError(f"activity has {NUM_SUBJECTS} subjects (one device each); got num_devices={n_dev}")
    recordings = load_recordings()
    subjects = sorted({r.subject for r in recordings})[:n_dev]
    devices = [_device(s, [r for r in recordings if r.subject == s], cap, rng, holdout) for s in subjects]
    return FederatedDataset(
        task="activity", devices=devices, num_classes=NUM_CLASSES, input_shape=(NUM_CHANNELS, WINDOW)
    )


def _device(
    subject: int, recordings: list[Recording], cap: int | None, rng: np.random.Generator, holdout: str
) -> DeviceData:
    xs: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    ys: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for seg in plan_segments(recordings, rng, holdout):
        rec = recordings[seg.recording]
        for s in window_starts(seg.start, seg.stop):
            xs[seg.split].append(rec.signal[s : s + WINDOW].T)
            ys[seg.split].append(rec.label)
    raw = {k: (np.stack(xs[k]), np.asarray(ys[k], dtype=np.int64)) for k in xs}
    sizes = capped_sizes(len(raw["train"][1]), len(raw["val"][1]), len(raw["test"][1]), cap)
    for k, size in zip(raw, sizes, strict=True):
        keep = subsample(raw[k][1], size, rng, stratify=True)
        raw[k] = (raw[k][0][keep], raw[k][1][keep])
    # The device's own training statistics only: nothing about val/test leaks into training.
    mean = raw["train"][0].mean(axis=(0, 2), keepdims=True)
    std = np.maximum(raw["train"][0].std(axis=(0, 2), keepdims=True), 1e-8)
    splits = [Split(((x - mean) / std).astype(np.float32), y) for x, y in raw.values()]
    return DeviceData(f"subject-{subject}", *splits)
