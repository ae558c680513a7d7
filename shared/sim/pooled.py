"""The capacity check: one model trained on every device's training data pooled, as if there were no
federation at all. It separates two reasons a federated method can trail a dense baseline:

  - capacity: a mask over the frozen random network cannot express what trained weights can (then
    the pooled mask trails the pooled dense network), or
  - federation: the pooled mask matches the pooled dense network, and what is lost is lost in the
    federated rounds (local drift, the 1-bit uploads, the merge).

Each model trains with the score (or weight) training of a named variant's tuned config, for up to
`epochs` passes over the pooled data. The epoch is chosen on the pooled validation split; test is
reported at that epoch only, as the mean of per-device accuracies (the metric every table uses), so
the figure compares directly with a federated run's personalized accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.data import FederatedDataset
from shared.device import derive_seed
from shared.models import ModelSpec, build_model
from shared.sim.result import mean_accuracy
from shared.sim.variants import MASK_VARIANTS, VariantConfig
from shared.train import evaluate, local_train

EpochDone = Callable[[int, int], None]  # (epochs done, epochs in all)


@dataclass(frozen=True)
class PooledResult:
    variant: str
    chosen_epoch: int            # by pooled validation accuracy (ties: the earlier epoch)
    validation_accuracy: float   # pooled validation samples, at the chosen epoch
    test_accuracy: float         # mean over devices of each device's test accuracy, at the chosen epoch
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: validation, test
    seconds: float = 0.0


def pooled(data: FederatedDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [getattr(d, split) for d in data.devices]
    return np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])


def train_pooled(cfg: VariantConfig, data: FederatedDataset, spec: ModelSpec, *, epochs: int, seed: int,
                 on_epoch: EpochDone | None = None) -> PooledResult:
    """`cfg`'s training (scores for the FedMask family, weights for a dense baseline) on the pooled
    training data. A FedMask-family variant is trained as one mask over the whole frozen network:
    no pruning, no personal head, no merge (what is measured is the network, not the method)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if cfg.variant not in MASK_VARIANTS and not cfg.dense:
        raise ValueError(f"{cfg.variant} trains through the strategy interface: choose a FedMask variant or a "
                         "dense baseline (fedavg, fedavg-ft, standalone, topk)")
    model = build_model(spec.with_(dense=cfg.dense, personal_head=False))
    x, y = pooled(data, "train")
    xv, yv = pooled(data, "val")
    start = time.perf_counter()
    curve: list[dict[str, float]] = []
    for e in range(epochs):
        local_train(model, x, y, 1, cfg.train, seed=derive_seed(seed, "pooled", e))
        val = evaluate(model, xv, yv)[1]
        test = mean_accuracy({d.device_id: evaluate(model, d.test.x, d.test.y)[1] for d in data.devices})
        curve.append({"epoch": e + 1, "validation": val, "test": test})
        if on_epoch:
            on_epoch(e + 1, epochs)
    best = max(range(len(curve)), key=lambda i: (curve[i]["validation"], -i))
    return PooledResult(cfg.variant, best + 1, curve[best]["validation"], curve[best]["test"], curve,
                        time.perf_counter() - start)
