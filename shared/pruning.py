"""One-shot pruning (paper Sec. 3.4): the step that gives each device its own structure."""

from __future__ import annotations

import numpy as np
import torch

from shared.models import MaskedNet
from shared.train import TrainConfig, TrainStats, local_train


def kept_count(elements: int, rho: float) -> int:
    """How many of a pruned layer's `elements` one-shot pruning keeps (at least one).
    shared/structures.py checks every hello against this same count."""
    return max(1, round(rho * elements))


def one_shot_prune(model: MaskedNet, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *,
                   last_k: int = 2, rho: float = 0.2, seed: int = 0) -> tuple[np.ndarray, TrainStats]:
    """Train scores for one epoch, then in each of the last `last_k` layers keep the `rho` share
    of elements with the largest |W * change of sigmoid(S)| and freeze the rest at 0.

    Returns the structure as a flat bool vector (also installed on the model) and the epoch's stats.
    The trained scores are kept: that epoch is useful training, not only a ranking pass.
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not 1 <= last_k <= model.num_layers:
        raise ValueError(f"last_k must be in 1..{model.num_layers}, got {last_k}")
    before = [torch.sigmoid(t.scores.detach() / cfg.temperature).clone() for t in model.masked()]
    stats = local_train(model, x, y, epochs=1, cfg=cfg, seed=seed)
    first = model.num_layers - last_k
    by_layer: dict[int, list[int]] = {}
    for i, t in enumerate(model.masked()):
        by_layer.setdefault(t.layer_index, []).append(i)
    keep: list[np.ndarray] = [np.ones(t.shape, dtype=bool) for t in model.masked()]
    for layer, members in by_layer.items():
        if layer < first:
            continue
        tensors = [model.masked()[i] for i in members]
        change = [
            (t.weight.detach() * (torch.sigmoid(t.scores.detach() / cfg.temperature) - before[i])).abs()
            for i, t in zip(members, tensors, strict=True)
        ]
        flat = torch.cat([c.reshape(-1) for c in change]).numpy()
        k = kept_count(flat.size, rho)
        # Stable sort: equal importance keeps the lower index, so every platform agrees.
        order = np.argsort(-flat, kind="stable")
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[order[:k]] = True
        offset = 0
        for i, t in zip(members, tensors, strict=True):
            n = t.weight.numel()
            keep[i] = chosen[offset:offset + n].reshape(t.shape)
            offset += n
    structure = np.concatenate([k.reshape(-1) for k in keep])
    model.set_structure(structure)
    return structure, stats
