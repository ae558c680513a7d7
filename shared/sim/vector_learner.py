"""A cheap but real FedMask learner for fleets of 1,000 to 10,000 simulated boards (numpy, batched).

Every board holds real-valued scores over one frozen random MLP (64 -> H -> H -> 10, signed-constant
weights shared by the fleet, as in shared/models.py); its mask is 1[score > 0] inside its structure.
Training is FedMask's: hard mask forward, straight-through sigmoid' backward, full-batch gradient
steps on the board's own samples. One-shot pruning keeps the `rho` share of the last two layers'
elements whose |W * change of sigmoid(score)| after one epoch is largest (shared/pruning.py's rule).
A merged mask is adopted as DeviceRuntime does it: scores keep their magnitude, take the bit's sign.
All boards in a call are trained together in one batched matmul chain, so a round of 10,000 boards
costs one call rather than 10,000.

The data are real (scikit-learn's 8x8 digits, 1,797 images): pools for train / validation / test are
disjoint; each board draws its classes (non-IID shards) and a few samples of each from the pools.
With more boards than images, boards share images (drawn independently per board). This is not the
project's torch model, nor its presets: it is a stand-in that learns, so modes can be compared at
fleet sizes where the torch path cannot run on this machine (docs/results.md says so too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from shared.bits import pack
from shared.merge_rules import MergeContext

_CHUNK = 1024  # boards per batched call


@dataclass(frozen=True)
class VectorConfig:
    # Chosen on the validation pools (docs/results.md, "Which rhythm"): with 3-4 classes per board every
    # majority rule left this learner below local training, and so did 3 samples per class (local 0.637,
    # paper 0.545 after 60 rounds); with one sample of each of the 10 classes and lr 10 x 2 steps the
    # paper merge ends above local training (0.511 vs 0.497 after 40 rounds) and keeps gaining.
    hidden: int = 48
    classes_per_device: int = 10
    train_per_class: int = 1
    val_per_class: int = 3
    test_per_class: int = 5
    local_steps: int = 2
    lr: float = 10.0
    rho: float = 0.5
    seed: int = 0


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


class VectorFedMask:
    """N boards' FedMask state, trained and evaluated in batches (the simulator's Learner). Its boards
    upload thresholded masks and adopt merged bits: no agreement downlink (the torch learner has it)."""

    downlink = "bits"

    def __init__(self, n_devices: int, cfg: VectorConfig = VectorConfig()) -> None:
        self.cfg = cfg
        x, y = _digits()
        rng = np.random.Generator(np.random.PCG64([cfg.seed, 1]))
        order = rng.permutation(len(y))
        cut1, cut2 = int(0.55 * len(y)), int(0.75 * len(y))
        pools = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
        by_class = {s: [p[y[p] == c] for c in range(10)] for s, p in pools.items()}
        self.ids = [f"dev-{i:05d}" for i in range(n_devices)]
        self.index = {d: i for i, d in enumerate(self.ids)}
        per = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
        self.x: dict[str, np.ndarray] = {}
        self.y: dict[str, np.ndarray] = {}
        classes = np.stack([rng.choice(10, cfg.classes_per_device, replace=False) for _ in range(n_devices)])
        for split, k in per.items():
            picks = np.stack([np.concatenate([rng.choice(by_class[split][c], k, replace=False) for c in row])
                              for row in classes])
            self.x[split], self.y[split] = x[picks], y[picks]
        h, wrng = cfg.hidden, np.random.Generator(np.random.PCG64([cfg.seed, 2]))
        self.shapes = [(64, h), (h, h), (h, 10)]
        self.w = [(wrng.choice([-1.0, 1.0], size=s) * np.sqrt(2.0 / s[0])).astype(np.float32) for s in self.shapes]
        self.sizes = [a * b for a, b in self.shapes]
        self.wflat = np.concatenate([wl.reshape(-1) for wl in self.w])
        self.bounds = np.cumsum([0, *self.sizes])
        self.nbits = int(self.bounds[-1])
        init = (wrng.uniform(-0.01, 0.01, self.nbits)).astype(np.float32)
        self.scores = np.tile(init, (n_devices, 1))
        region = np.zeros(self.nbits, dtype=bool)
        region[self.bounds[1]:] = True  # the last two layers: the ones pruning thins
        self.ctx = MergeContext(nbits=self.nbits, pruned_region=pack(region))
        self.initial = pack(init > 0)
        self.structure = np.ones((n_devices, self.nbits), dtype=bool)
        self._prune(region)
        self.packed_structure = np.packbits(self.structure, axis=1)

    # -- the learner protocol ------------------------------------------------------------
    def device_ids(self) -> list[str]:
        return list(self.ids)

    def structures(self) -> dict[str, np.ndarray]:
        return {d: self.packed_structure[i] for i, d in enumerate(self.ids)}

    def train(self, devices: list[str], tags: list[int]) -> list[np.ndarray]:
        """One local training task per listed board (distinct boards); their updates, packed full.
        Full-batch steps: no draw, so the tags (task seeds) do not matter here."""
        out: list[np.ndarray] = []
        for lo in range(0, len(devices), _CHUNK):  # bounded temporaries at 10,000 boards
            idx = np.array([self.index[d] for d in devices[lo:lo + _CHUNK]])
            self.scores[idx] = self._steps(idx, self.scores[idx], self.cfg.local_steps)
            out.extend(np.packbits(self._masks(idx), axis=1))
        return out

    def apply(self, devices: list[str], masks: list[np.ndarray], versions: list[int]) -> None:
        idx = np.array([self.index[d] for d in devices])
        bits = np.unpackbits(np.stack(masks), axis=1, count=self.nbits).astype(bool)
        s = self.scores[idx]
        self.scores[idx] = np.maximum(np.abs(s), 1e-3) * np.where(bits, 1.0, -1.0).astype(np.float32)

    def accuracy(self, split: str = "test", devices: list[str] | None = None) -> dict[str, float]:
        ids = self.ids if devices is None else devices
        out: dict[str, float] = {}
        for lo in range(0, len(ids), _CHUNK):
            chunk = ids[lo:lo + _CHUNK]
            idx = np.array([self.index[d] for d in chunk])
            logits = self._forward(idx, self._masks(idx), self.x[split][idx])[-1]
            acc = (logits.argmax(-1) == self.y[split][idx]).mean(axis=1)
            out.update(zip(chunk, acc.tolist(), strict=True))
        return out

    # -- internals -------------------------------------------------------------------------
    def _masks(self, idx: np.ndarray) -> np.ndarray:
        out: np.ndarray = (self.scores[idx] > 0) & self.structure[idx]
        return out

    def _layers(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[:, self.bounds[i]:self.bounds[i + 1]].reshape(-1, *s) for i, s in enumerate(self.shapes)]

    def _forward(self, idx: np.ndarray, masks: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        w = [wl * ml for wl, ml in zip(self.w, self._layers(masks.astype(np.float32)), strict=True)]
        z1 = x @ w[0]
        a1 = np.maximum(z1, 0)
        z2 = a1 @ w[1]
        a2 = np.maximum(z2, 0)
        return [*w, z1, a1, z2, a2, a2 @ w[2]]

    def _steps(self, idx: np.ndarray, scores: np.ndarray, steps: int) -> np.ndarray:
        x, y = self.x["train"][idx], self.y["train"][idx]
        n = x.shape[1]
        onehot = np.eye(10, dtype=np.float32)[y]
        struct = self.structure[idx]
        xt = np.swapaxes(x, 1, 2)
        for _ in range(steps):
            masks = (scores > 0) & struct
            _, w2, w3, z1, a1, z2, a2, logits = self._forward(idx, masks, x)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            g3 = (p - onehot) / n
            gw3 = np.swapaxes(a2, 1, 2) @ g3
            gz2 = (g3 @ np.swapaxes(w3, 1, 2)) * (z2 > 0)
            gw2 = np.swapaxes(a1, 1, 2) @ gz2
            gz1 = (gz2 @ np.swapaxes(w2, 1, 2)) * (z1 > 0)
            gw1 = xt @ gz1
            # In place over (boards, bits): the score step lr x dL/dW_eff x W x sigmoid'(score). Scores
            # outside the structure move too but never count: every mask is ANDed with the structure.
            grad = np.empty_like(scores)
            for layer, g in enumerate((gw1, gw2, gw3)):
                grad[:, self.bounds[layer]:self.bounds[layer + 1]] = g.reshape(len(idx), -1)
            grad *= self.wflat
            sig = np.exp(-scores)
            sig += 1.0
            np.reciprocal(sig, out=sig)
            grad *= sig
            np.subtract(1.0, sig, out=sig)
            grad *= sig
            grad *= self.cfg.lr
            scores = scores - grad
        return scores

    def _prune(self, region: np.ndarray) -> None:
        """One epoch of training, then keep the rho share of each pruned layer's elements by
        |W * change of sigmoid(score)| (stable order, as shared/pruning.py)."""
        every = np.arange(len(self.ids))
        for lo in range(0, len(every), _CHUNK):
            idx = every[lo:lo + _CHUNK]
            before = 1.0 / (1.0 + np.exp(-self.scores[idx]))
            after = self._steps(idx, self.scores[idx], 1)
            change = np.abs(np.concatenate([wl.reshape(-1) for wl in self.w]) * (1.0 / (1.0 + np.exp(-after)) - before))
            self.scores[idx] = after
            for layer in (1, 2):
                a, b = self.bounds[layer], self.bounds[layer + 1]
                keep = max(1, round(self.cfg.rho * (b - a)))
                order = np.argsort(-change[:, a:b], axis=1, kind="stable")[:, :keep]
                block = np.zeros((len(idx), b - a), dtype=bool)
                np.put_along_axis(block, order, True, axis=1)
                self.structure[idx, a:b] = block
        assert region[self.bounds[1]:].all()
