"""Pure-numpy partitioners: which sample goes to which device, and to which split on that device.

Every function takes an explicit `numpy.random.Generator` and returns index arrays into the
`labels` it was given; no index is ever returned twice.
"""

from __future__ import annotations

import math

import numpy as np

from shared.errors import ConfigError

IntArray = np.ndarray


def largest_remainder(total: int, weights: np.ndarray) -> IntArray:
    """Integers proportional to `weights` that sum exactly to `total` (Hamilton's method)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(len(w), dtype=np.int64)
    share = total * w / w.sum()
    out: IntArray = np.floor(share).astype(np.int64)
    # Stable sort so ties go to the lower index: the result depends only on the inputs.
    extra = np.argsort(-(share - out), kind="stable")[: total - int(out.sum())]
    out[extra] += 1
    return out


def _shards_per_class(
    counts: IntArray, num_shards: int, num_devices: int, rng: np.random.Generator
) -> IntArray:
    """How many shards each class is cut into.

    A class may be cut into at most `num_devices` shards (it cannot sit twice on one device) and
    at most one shard per sample. Beyond one shard each, shards go to classes by D'Hondt, so
    larger classes get proportionally more.
    """
    num_classes = len(counts)
    caps = np.minimum(counts, num_devices)
    if int(caps.sum()) < num_shards:
        raise ConfigError(
            f"cannot cut {num_shards} label shards from {int(counts.sum())} samples of {num_classes} "
            f"classes; use fewer devices"
        )
    k = np.zeros(num_classes, dtype=np.int64)
    if num_shards <= num_classes:
        k[rng.choice(num_classes, size=num_shards, replace=False)] = 1
        return k
    k[:] = 1
    for _ in range(num_shards - num_classes):
        quotient = np.where(k < caps, counts / (k + 1), -np.inf)
        k[int(np.argmax(quotient))] += 1
    return k


def _unequal_sizes(n: int, k: int, min_size: int, sigma: float, rng: np.random.Generator) -> IntArray:
    """Split `n` into `k` lognormally unequal positive parts, each at least `min(min_size, n // k)`."""
    floor = min(min_size, n // k)
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=k)
    return np.asarray(floor + largest_remainder(n - k * floor, weights), dtype=np.int64)


def label_shards(
    labels: np.ndarray,
    num_devices: int,
    classes_per_device: int,
    rng: np.random.Generator,
    *,
    min_shard: int = 12,
    sigma: float = 1.0,
) -> list[IntArray]:
    """Pathological non-IID split: each device holds `classes_per_device` shards of distinct classes.

    Shards are cut *within* a class (never across a class boundary), with lognormal sizes so
    devices hold unequal amounts. Distinct classes are guaranteed by construction: shards are laid
    out class block after class block and device `d` starts with shards `d, d + N, d + 2N, ...`
    (N = num_devices); a class is cut into at most N shards, so its block is shorter than N and
    two shards N apart never share a class. That layout pairs classes rigidly (neighbouring
    devices get the same pair), so random swaps between devices follow, each applied only if
    both devices still hold distinct classes afterwards -- the guarantee survives every step.
    """
    labels = np.asarray(labels)
    if num_devices < 1 or classes_per_device < 1:
        raise ConfigError("num_devices and classes_per_device must be at least 1")
    classes, counts = np.unique(labels, return_counts=True)
    if classes_per_device > len(classes):
        raise ConfigError(f"classes_per_device={classes_per_device} but only {len(classes)} classes exist")
    k = _shards_per_class(counts, num_devices * classes_per_device, num_devices, rng)
    shards: list[IntArray] = []
    for c in rng.permutation(len(classes)):
        if k[c] == 0:
            continue
        members = rng.permutation(np.flatnonzero(labels == classes[c]))
        sizes = _unequal_sizes(len(members), int(k[c]), min_shard, sigma, rng)
        shards.extend(np.split(members, np.cumsum(sizes)[:-1]))
    shard_class = [int(labels[s[0]]) for s in shards]
    held = [list(range(d, len(shards), num_devices)) for d in range(num_devices)]
    _mix(held, shard_class, rng)
    return [np.sort(np.concatenate([shards[s] for s in h])) for h in held]


def _mix(held: list[list[int]], shard_class: list[int], rng: np.random.Generator, rounds: int = 20) -> None:
    """Swap shards between random device pairs in place, keeping each device's classes distinct."""
    if len(held) < 2:
        return
    per_device = len(held[0])
    for _ in range(rounds * len(shard_class)):
        i, j = (int(v) for v in rng.choice(len(held), size=2, replace=False))
        a, b = (int(v) for v in rng.integers(per_device, size=2))
        ca, cb = shard_class[held[i][a]], shard_class[held[j][b]]
        rest_i = {shard_class[s] for k, s in enumerate(held[i]) if k != a}
        rest_j = {shard_class[s] for k, s in enumerate(held[j]) if k != b}
        if cb not in rest_i and ca not in rest_j:
            held[i][a], held[j][b] = held[j][b], held[i][a]


def dirichlet_partition(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
) -> list[IntArray]:
    """Per-class Dirichlet(alpha) proportions over devices, then topped up to `min_size` each.

    Redrawing until every device reaches `min_size` (the usual recipe) almost never ends for
    small alpha with many devices, so devices left short instead take random samples from
    the currently largest device. On mnist with 100 devices that moves a handful of the 5,000
    samples at alpha=0.5 and about 2% at alpha=0.1.
    """
    labels = np.asarray(labels)
    if num_devices < 1 or alpha <= 0:
        raise ConfigError("num_devices must be at least 1 and alpha positive")
    if num_devices * min_size > len(labels):
        raise ConfigError(f"{num_devices} devices x {min_size} samples exceeds the {len(labels)} available")
    parts: list[list[IntArray]] = [[] for _ in range(num_devices)]
    for c in np.unique(labels):
        shuffled = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(p)[:-1] * len(shuffled)).astype(np.int64)
        for d, chunk in enumerate(np.split(shuffled, cuts)):
            parts[d].append(chunk)
    devices = [rng.permutation(np.concatenate(chunks)) for chunks in parts]
    while True:
        sizes = [len(d) for d in devices]
        short, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        need = min_size - sizes[short]
        if need <= 0:
            break
        # Devices are already shuffled, so the donor's tail is a random subset of it.
        take = min(need, sizes[big] - min_size)
        devices[short] = np.concatenate([devices[short], devices[big][-take:]])
        devices[big] = devices[big][:-take]
    return [np.sort(d) for d in devices]


def stratified_split(
    labels: np.ndarray, rng: np.random.Generator, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> tuple[IntArray, IntArray, IntArray]:
    """Per class, shuffle and cut into train/val/test positions.

    Small classes: 1 sample -> train only; 2 -> one train, one test; 3+ -> at least one in each,
    so every class a device holds is tested whenever it has two samples or more.
    """
    labels = np.asarray(labels)
    _, f_val, f_test = fractions
    out: tuple[list[IntArray], list[IntArray], list[IntArray]] = ([], [], [])
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        m = len(members)
        if m == 1:
            n_val, n_test = 0, 0
        elif m == 2:
            n_val, n_test = 0, 1
        else:
            n_val = max(1, math.floor(m * f_val + 0.5))
            n_test = max(1, math.floor(m * f_test + 0.5))
            while m - n_val - n_test < 1:  # fractions near 1 would otherwise starve train
                if n_val >= n_test:
                    n_val -= 1
                else:
                    n_test -= 1
        n_train = m - n_val - n_test
        for bucket, part in zip(out, np.split(members, [n_train, n_train + n_val]), strict=True):
            bucket.append(part)
    train, val, test = (np.sort(np.concatenate(b)) if b else np.zeros(0, np.int64) for b in out)
    return train, val, test


def capped_sizes(n_train: int, n_val: int, n_test: int, cap: int | None) -> tuple[int, int, int]:
    """Cap train at `cap` and shrink val/test by the same factor (rounding up, so none empties)."""
    if cap is None or n_train <= cap:
        return n_train, n_val, n_test
    # Integer ceil(n * cap / n_train): float factors round 30 * 0.1 up to 4.
    return cap, -(-n_val * cap // n_train), -(-n_test * cap // n_train)


def subsample(labels: np.ndarray, size: int, rng: np.random.Generator, *, stratify: bool) -> IntArray:
    """Sorted positions of `size` samples; stratified keeps every class once `size` allows it."""
    labels = np.asarray(labels)
    n = len(labels)
    if size >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    if not stratify or size < len(classes):
        return np.sort(rng.choice(n, size=size, replace=False))
    # One per class first, the rest in proportion; never more than a class has.
    quota = 1 + largest_remainder(size - len(classes), counts - 1)
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picks))
