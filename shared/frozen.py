"""Frozen random weights derived from a model seed, bit-identical on x86-64 and aarch64.

torch's CPU generator makes no cross-platform promise, so every frozen tensor is drawn from
numpy's PCG64 (a documented, stable bit stream) using integer draws only: no libm calls
(log/exp in a normal sampler) whose last bit could differ between platforms.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

import numpy as np

INITS = ("signed_constant", "kaiming_uniform")


def tensor_rng(model_seed: int, name: str) -> np.random.Generator:
    """An independent PCG64 stream per (seed, tensor name), so adding a layer never shifts another."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([model_seed, zlib.crc32(name.encode())])))


def frozen_weight(model_seed: int, name: str, shape: tuple[int, ...], fan_in: int,
                  init: str = "signed_constant", scale: float = 1.0) -> np.ndarray:
    """Draw one frozen float32 tensor.

    signed_constant: +-sqrt(2/fan_in), the init under which mask-only training works best
    (Zhou et al. 2019; Ramanujan et al. 2020). kaiming_uniform: U(-b, b), b = sqrt(6/fan_in).
    Both use integer draws and exact float arithmetic only.
    """
    rng = tensor_rng(model_seed, name)
    if init == "signed_constant":
        signs = rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float64) * 2.0 - 1.0
        out = signs * (np.sqrt(2.0 / fan_in) * scale)
    elif init == "kaiming_uniform":
        # 53-bit integers -> [0, 1) by an exact power-of-two division.
        u = rng.integers(0, 1 << 53, size=shape, dtype=np.int64).astype(np.float64) / float(1 << 53)
        out = (u * 2.0 - 1.0) * (np.sqrt(6.0 / fan_in) * scale)
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    result: np.ndarray = out.astype(np.float32)
    return result


def initial_scores(model_seed: int, name: str, shape: tuple[int, ...], spread: float) -> np.ndarray:
    """The server's initial real-valued mask (the paper's global mask M^0): U(-spread, spread)."""
    rng = tensor_rng(model_seed + 1_000_003, name)
    u = rng.integers(0, 1 << 53, size=shape, dtype=np.int64).astype(np.float64) / float(1 << 53)
    return ((u * 2.0 - 1.0) * spread).astype(np.float32)


def fingerprint(tensors: Iterable[tuple[str, np.ndarray]]) -> str:
    """Hash of names, shapes and little-endian float32 bytes: what every message carries."""
    h = hashlib.sha256()
    for name, arr in tensors:
        h.update(name.encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return h.hexdigest()[:32]


def layout_hash(entries: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Hash of the masked tensors' names and shapes, in wire order."""
    h = hashlib.sha256()
    for name, shape in entries:
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:32]
