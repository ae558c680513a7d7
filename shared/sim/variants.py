"""Named method variants, each one complete configuration, and one way to run any of them.

A variant is what a results table calls a row: FedMask with the majority rule, the same with no
merge, the agreement merge, FedPM's one global model, and the dense baselines. Its config holds
every knob the run needs beyond the task's federation shape (devices, rounds, sample rate, model),
which stays the same for every variant so that they are compared on equal terms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.data import FederatedDataset
from shared.device import FedMaskConfig
from shared.models import ModelSpec
from shared.rounds import sample_count
from shared.sim.baselines import run_baseline
from shared.sim.byzantine import Adversary
from shared.sim.fedmask import run_fedmask
from shared.sim.result import Progress, SimResult
from shared.sim.strategy_run import run_strategy
from shared.strategies.base import StrategyConfig
from shared.strategies.standalone import standalone_epochs
from shared.train import TrainConfig

if TYPE_CHECKING:  # presets reads tuned configs through this module: no runtime import back
    from shared.presets import TaskPreset

DENSE_VARIANTS = ("fedavg", "fedavg-ft", "standalone", "topk")
MASK_VARIANTS = ("fedmask", "fedmask-local", "fedmask-agree", "fedmask-adapt", "fedmask-adapt-local", "fedpm")
# Run through the strategy interface (shared/strategies/, shared/sim/strategy_run.py).
STRATEGY_VARIANTS = ("feddst", "zerofl", "lg-fedavg", "per-fedavg", "bnn-fedavg")
VARIANTS = (*DENSE_VARIANTS, *MASK_VARIANTS, *STRATEGY_VARIANTS)
# Variants with their own path that can also run through a strategy (run_variant's via_strategy): all of
# them (the strategy variants have no other path).
VIA_STRATEGY = (*MASK_VARIANTS, *DENSE_VARIANTS)
_TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))
# The shares a fedmask-adapt* device tries on its own validation split: none of the fleet's agreement to all of it.
ADAPT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class VariantConfig:
    """Everything a variant's run needs beyond the task's federation shape.

    `train` is the dense weights' TrainConfig for the baselines (weight_optimizer, weight_lr) and
    the scores' for the FedMask family (optimizer, lr; weight_lr then trains a personal head)."""

    variant: str
    train: TrainConfig
    local_epochs: int
    final_local_epochs: int = 0    # fedavg-ft: fine-tune epochs; FedMask family: local adaptation
    topk_fraction: float = 0.1     # topk only
    merge: str | None = None       # FedMask family only
    prune_rho: float = 0.2         # 1.0: no pruning
    prune_last_k: int = 2
    upload: str = "threshold"
    share: float = 1.0
    share_grid: tuple[float, ...] = ()  # fedmask-adapt: each device picks its share on its own validation
    personal_head: bool = False
    broadcast_final: bool = False  # fedpm: the last agreement reaches every device before evaluation
    # Strategy variants (shared/strategies/base.StrategyConfig documents each knob):
    sparsity: float = 0.8          # feddst: S; zerofl: SWAT's sp
    alpha: float = 0.01            # feddst: readjustment ratio (cosine-annealed)
    readjust_every: int = 15       # feddst: R_adj
    density_rule: str = "erk"      # feddst: erk | uniform
    mask_ratio: float = 0.2        # zerofl: mr
    unsent: str = "zero"           # zerofl: zero | holders | keep
    sparsify_first: bool = False   # zerofl: SWAT on the first layer too
    head_layers: int = 1           # lg-fedavg: the global (shared) last tensors
    inner_lr: float = 0.01         # per-fedavg: alpha
    outer_lr: float = 0.001        # per-fedavg: beta
    bnn_scale: bool = True         # bnn-fedavg: per-layer mean|w| scale

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")

    @property
    def dense(self) -> bool:
        return self.variant in DENSE_VARIANTS

    @property
    def strategy(self) -> bool:
        return self.variant in STRATEGY_VARIANTS

    def strategy_config(self) -> StrategyConfig:
        """A dense or strategy variant as its strategy's config (standalone's budget, which depends on the
        run's rounds and sample rate, is run_variant's)."""
        return StrategyConfig(train=self.train, local_epochs=self.local_epochs, sparsity=self.sparsity,
                              alpha=self.alpha, readjust_every=self.readjust_every, density_rule=self.density_rule,
                              mask_ratio=self.mask_ratio, unsent=self.unsent, sparsify_first=self.sparsify_first,
                              head_layers=self.head_layers, inner_lr=self.inner_lr, outer_lr=self.outer_lr,
                              bnn_scale=self.bnn_scale, topk_fraction=self.topk_fraction,
                              final_local_epochs=self.final_local_epochs)

    def with_(self, **changes: Any) -> VariantConfig:
        """Change knobs by name; TrainConfig's fields (lr, batch_size, ...) go to `train`."""
        train = {k: v for k, v in changes.items() if k in _TRAIN_FIELDS}
        own = {k: v for k, v in changes.items() if k not in _TRAIN_FIELDS}
        if "share_grid" in own:  # JSON gives a list; the config stays hashable and comparable
            own["share_grid"] = tuple(float(v) for v in own["share_grid"])
        unknown = set(own) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)} for a variant config")
        return replace(self, train=self.train.with_(**train), **own)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any], base: VariantConfig) -> VariantConfig:
        """Knobs read over `base` (the variant's default), so a file written before a knob existed
        still loads; an unknown knob is an error, not silently dropped."""
        raw = dict(raw)
        if raw.pop("variant", base.variant) != base.variant:
            raise ValueError(f"config is for another variant than {base.variant!r}")
        return base.with_(**raw.pop("train", {}), **raw)

    def fedmask_strategy_config(self) -> StrategyConfig:
        """A FedMask-family variant as the fedmask strategy's config (shared/strategies/fedmask.py)."""
        return StrategyConfig(train=self.train, local_epochs=self.local_epochs, fedmask=self.fedmask_config(),
                              merge=self.merge or "paper", final_local_epochs=self.final_local_epochs,
                              broadcast_final=self.broadcast_final)

    def fedmask_config(self) -> FedMaskConfig:
        return FedMaskConfig(train=self.train, local_epochs=self.local_epochs, prune_last_k=self.prune_last_k,
                             prune_rho=self.prune_rho, upload=self.upload, share=self.share,
                             share_grid=self.share_grid)


def default_config(variant: str, p: TaskPreset) -> VariantConfig:
    """The variant's configuration before tuning: the task preset's settings where the variant
    has them (today's defaults), FedPM's published choices for the agreement variants."""
    if variant in DENSE_VARIANTS:
        final = {"fedavg-ft": p.local_epochs, "standalone": p.final_local_epochs}.get(variant, 0)
        return VariantConfig(variant, p.dense_train, p.local_epochs, final_local_epochs=final)
    if variant in STRATEGY_VARIANTS:
        # The papers' optimizer (SGD, momentum 0.9, lr 0.01) with the task's batch size and local budget.
        sgd = p.dense_train.with_(weight_optimizer="sgd", weight_lr=0.01, momentum=0.9)
        if variant in ("lg-fedavg", "bnn-fedavg", "per-fedavg"):  # baselines: the dense baselines' default training
            return VariantConfig(variant, p.dense_train, p.local_epochs)
        return VariantConfig(variant, sgd, p.local_epochs, sparsity=0.8 if variant == "feddst" else 0.9)
    if variant in ("fedmask", "fedmask-local", "fedmask-adapt-local"):
        # train.py trains every group with the scores' optimizer kind: record that kind for the
        # weights too (no change in behaviour), so a config says what actually runs.
        scores = p.mask_train.with_(weight_optimizer=p.mask_train.optimizer)
        if variant == "fedmask-adapt-local":
            # fedmask-local's own training (thresholded masks, its optimizer, its pruning) with the
            # fleet's agreement over those thresholded masks sent down; each device blends it in at
            # the share its own validation split prefers, share 0 (keep its scores: exactly `local`
            # for that device) included. Validation chooses the training mode per device, not only
            # the share: the agreement family's sampled-mask training loses to `local` on label shards.
            return VariantConfig(variant, scores, p.local_epochs, final_local_epochs=p.final_local_epochs,
                                 merge="agreement", upload="threshold", share=0.0, share_grid=ADAPT_SHARES)
        return VariantConfig(variant, scores, p.local_epochs, final_local_epochs=p.final_local_epochs,
                             merge=p.merge if variant == "fedmask" else "local")
    # FedPM trains scores with Adam (lr 0.1) through sampled masks, and has no sparsity term
    # (the group lasso would pull sigmoid(S) down, biasing the very samples devices upload).
    agree = p.mask_train.with_(mask_mode="bernoulli", optimizer="adam", weight_optimizer="adam", lr=0.1,
                               weight_lr=1e-2, lam=0.0)
    if variant in ("fedmask-agree", "fedmask-adapt"):
        # fedmask-adapt is fedmask-agree whose share each device chooses on its own validation split,
        # every time an agreement arrives, from none of the fleet's agreement to all of it.
        grid = ADAPT_SHARES if variant == "fedmask-adapt" else ()
        return VariantConfig(variant, agree, p.local_epochs, final_local_epochs=p.final_local_epochs,
                             merge="agreement", upload="sample", share=0.5, share_grid=grid, personal_head=True,
                             prune_rho=0.5)
    if variant == "fedpm":
        return VariantConfig(variant, agree, p.local_epochs, merge="agreement", upload="sample", share=1.0,
                             prune_rho=1.0, broadcast_final=True)
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def run_variant(cfg: VariantConfig, data: FederatedDataset, spec: ModelSpec, *, rounds: int, sample_rate: float,
                seed: int, eval_every: int = 0, progress: Progress | None = None,
                save_devices: Path | None = None, adversary: Adversary | None = None,
                via_strategy: bool = False) -> SimResult:
    """Run one variant; the result's `method` is the variant's name, and extra["downloads"] and
    extra["downlink_bits_per_param"] say what the downlink cost per model or mask received:
    8 * downlink_bytes / (params * downloads), downloads = one per participant per round (the
    merged mask, or the global model) plus any final downloads (fedavg-ft, the fedpm broadcast).

    via_strategy (the FedMask family and the dense baselines): run through the strategy interface
    (shared/strategies/: fedmask, fedavg, fedavg-ft, standalone, topk) instead of the variant's own
    path: the same masks and accuracies, bytes counted from strategy messages (a strategy variant
    runs through it either way)."""
    if via_strategy and not cfg.strategy:
        if cfg.variant not in VIA_STRATEGY:
            raise ValueError(f"{cfg.variant} has no strategy of its own: via_strategy is for {VIA_STRATEGY}")
        if adversary is not None:
            raise ValueError("the Byzantine hook is in FedMask's own update path, not in the strategies")
        mask = cfg.variant in MASK_VARIANTS
        scfg = cfg.fedmask_strategy_config() if mask else cfg.strategy_config()
        if cfg.variant == "standalone":
            scfg = scfg.with_(standalone_epochs=standalone_epochs(cfg.local_epochs, rounds, sample_rate,
                                                                  cfg.final_local_epochs))
        r = run_strategy("fedmask" if mask else cfg.variant, scfg, data, spec.with_(personal_head=cfg.personal_head),
                         rounds=rounds, sample_rate=sample_rate, seed=seed, eval_every=eval_every,
                         progress=progress, save_dir=save_devices)
        own = {"local_epochs_total": scfg.standalone_epochs} if cfg.variant == "standalone" else {}  # as the baseline's
        return replace(r, method=cfg.variant, merge=(cfg.merge or "paper") if mask else None,
                       extra={**r.extra, **own, "via": "strategy", "config": cfg.to_json()})
    if cfg.strategy:
        if adversary is not None or save_devices is not None:
            raise ValueError(f"{cfg.variant} runs through the strategy interface: no Byzantine hook, no saved devices")
        r = run_strategy(cfg.variant, cfg.strategy_config(), data, spec, rounds=rounds, sample_rate=sample_rate,
                         seed=seed, eval_every=eval_every, progress=progress)
        return replace(r, method=cfg.variant, extra={**r.extra, "config": cfg.to_json()})
    if cfg.dense:
        if adversary is not None:
            raise ValueError("the Byzantine hook is in FedMask's update path; dense baselines have none")
        r = run_baseline(cfg.variant, data, spec, cfg.train, rounds=rounds, sample_rate=sample_rate,
                         local_epochs=cfg.local_epochs, seed=seed, topk_fraction=cfg.topk_fraction,
                         final_local_epochs=cfg.final_local_epochs, eval_every=eval_every, progress=progress)
        per_round = 0 if cfg.variant == "standalone" else sample_count(len(data.devices), rate=sample_rate)
        downloads = rounds * per_round + (len(data.devices) if cfg.variant == "fedavg-ft" else 0)
    else:
        r = run_fedmask(data, spec.with_(personal_head=cfg.personal_head), cfg.fedmask_config(), rounds=rounds,
                        sample_rate=sample_rate, seed=seed, merge=cfg.merge or "paper",
                        final_local_epochs=cfg.final_local_epochs, eval_every=eval_every, progress=progress,
                        save_dir=save_devices, broadcast_final=cfg.broadcast_final, adversary=adversary)
        last_round_left_out = len(data.devices) - sample_count(len(data.devices), rate=sample_rate)
        downloads = r.extra["updates"] + (last_round_left_out if cfg.broadcast_final and rounds else 0)
    down_bits = 8 * r.downlink_bytes / (r.params * downloads) if downloads else 0.0
    return replace(r, method=cfg.variant,
                   extra={**r.extra, "downloads": downloads, "downlink_bits_per_param": down_bits,
                          "config": cfg.to_json()})
