"""Local training of mask scores (or of dense weights, for baselines) and evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from shared.models import MaskedNet


@dataclass(frozen=True)
class TrainConfig:
    """Local-training hyper-parameters. Chosen on validation splits; see docs/results.md ("What was tried")."""

    optimizer: str = "adam"      # for scores: adam | sgd
    lr: float = 0.1              # scores' learning rate (large: scores only decide a sign)
    weight_lr: float = 0.01      # real-valued weights (dense baselines, the LSTM's real gate)
    weight_optimizer: str = "adam"
    momentum: float = 0.9
    batch_size: int = 16
    mask_mode: str = "ste"       # ste: hard forward, sigmoid' backward | sigmoid: soft forward (Eq. 6)
    #                              | bernoulli: a sampled mask each forward (FedPM)
    temperature: float = 1.0
    lam: float = 0.0             # structured-sparsity coefficient (Eq. 10), per element
    threads: int = 1             # tiny models on a 2-core board run fastest single-threaded

    def with_(self, **changes: object) -> TrainConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainStats:
    samples: int
    loss: float
    accuracy: float
    seconds: float


def _optimizer(model: MaskedNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    scores = [t.scores for t in model.masked() if t.scores.requires_grad]
    score_ids = {id(p) for p in scores}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in score_ids]
    groups = []
    if scores:
        groups.append({"params": scores, "lr": cfg.lr, "kind": cfg.optimizer})
    if others:
        groups.append({"params": others, "lr": cfg.weight_lr, "kind": cfg.weight_optimizer})
    # One optimizer class per run keeps state handling simple; both groups share it.
    kind = groups[0]["kind"]
    if kind == "adam":
        return torch.optim.Adam(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {kind!r}; choose adam or sgd")


def local_train(model: MaskedNet, x: np.ndarray, y: np.ndarray, epochs: int, cfg: TrainConfig,
                seed: int) -> TrainStats:
    """Train for `epochs` passes over (x, y); batch order from PCG64(seed) so runs repeat exactly."""
    torch.set_num_threads(cfg.threads)
    model.train()
    model.set_mask_mode(cfg.mask_mode, cfg.temperature, seed=seed)
    opt = _optimizer(model, cfg)
    rng = np.random.Generator(np.random.PCG64(seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(y)
    start = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for lo in range(0, n, cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            xb, yb = xt[idx], yt[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if cfg.lam > 0 and not model.spec.dense:
                loss = loss + cfg.lam * model.group_lasso()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
    model.eval()
    return TrainStats(samples=n, loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1),
                      seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: MaskedNet, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) with the hard 0.5-threshold mask, as deployed."""
    model.eval()
    if len(y) == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for lo in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[lo:lo + batch_size])
        yb = torch.from_numpy(y[lo:lo + batch_size])
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)
