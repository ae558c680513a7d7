"""Even-handed tuning: the same number of random-search trials for every variant, drawn from a
declared grid with a seeded RNG, scored on validation accuracy only.

Trial 1 is always the variant's default, so tuning can only replace it with a config that does
better on validation (ties keep the earlier trial). Test accuracy is never computed into, nor
recorded in, a tuning file. Tuning runs on data seed 100 by default: a partition distinct from
the evaluation seeds 0, 1, 2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.data import FederatedDataset
from shared.device import derive_seed
from shared.models import ModelSpec
from shared.sim.result import Progress, SimResult
from shared.sim.variants import VARIANTS, VariantConfig, default_config, run_variant

if TYPE_CHECKING:
    from shared.presets import TaskPreset

TUNE_SEED = 100
# A variant without a tuning file of its own takes these variants' tuned choices (see load_tuned).
# An untuned variant that is another one plus a per-device choice takes the other's tuned config (its
# budget, and no more) and keeps its own values of these knobs: what makes it that variant.
BORROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedmask-adapt": ("fedmask-agree", ("share_grid",)),
    "fedmask-adapt-local": ("fedmask-local", ("merge", "upload", "share", "share_grid")),
}
DEFAULT_TRIALS = 8
TUNED_DIR = Path(__file__).resolve().parents[1] / "tuned"  # shared/tuned: package data

Choice = dict[str, Any]   # knob changes applied together (see VariantConfig.with_)
Grid = list[list[Choice]]  # axes; a grid point takes one choice from every axis


def _dense_opt(kind: str, momentum: float | None, lrs: tuple[float, ...]) -> list[Choice]:
    extra = {} if momentum is None else {"momentum": momentum}  # Adam has no momentum knob
    return [{"weight_optimizer": kind, "weight_lr": lr, **extra} for lr in lrs]


def _score_opt(kind: str, lrs: tuple[float, ...]) -> list[Choice]:
    # weight_optimizer follows the scores' (train.py builds one optimizer, the scores' kind, for
    # every group), so the recorded config says what actually trains a personal head.
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    return [{"optimizer": kind, "weight_optimizer": kind, "lr": lr, **extra} for lr in lrs]


def _axis(knob: str, values: tuple[Any, ...]) -> list[Choice]:
    return [{knob: v} for v in values]


# Dense weights: each optimizer over the 4 half-decades around its usual working rate (plain SGD
# wants ~10x momentum SGD's rate; Adam centres on 1e-3). Batch 16/32: small devices, few batches.
_DENSE: Grid = [
    _dense_opt("sgd", 0.0, (0.01, 0.03, 0.1, 0.3)) + _dense_opt("sgd", 0.9, (0.003, 0.01, 0.03, 0.1))
    + _dense_opt("adam", None, (1e-4, 3e-4, 1e-3, 3e-3)),
    _axis("batch_size", (16, 32)),
]
# Scores only decide a sign through a sigmoid, so their useful rates are far larger than weights'
# (the presets' SGD rate is 1.0). Pruning keeps rho of the last K layers (the paper uses 0.2).
# Final local epochs: none, or the preset's 5 (FedMask's local adaptation, as FedAvg-FT fine-tunes).
_MASK_MAJORITY: Grid = [
    _score_opt("sgd", (0.3, 1.0, 3.0)) + _score_opt("adam", (0.01, 0.03, 0.1)),
    _axis("batch_size", (16, 32)),
    _axis("prune_rho", (0.1, 0.2, 0.5)),
    _axis("prune_last_k", (1, 2)),
    _axis("final_local_epochs", (0, 5)),
]
# Sampled masks (FedPM) train best with Adam near 0.1; SGD+momentum kept for an even comparison.
_AGREE_OPT = _score_opt("adam", (0.03, 0.1, 0.3)) + _score_opt("sgd", (0.3, 1.0, 3.0))

GRIDS: dict[str, Grid] = {
    "fedavg": _DENSE,
    "standalone": _DENSE,
    # The fine-tune is FedAvg-FT's whole personalization: 1 to 5 epochs (the preset uses local_epochs).
    "fedavg-ft": [*_DENSE, _axis("final_local_epochs", (1, 3, 5))],
    # Top-k keeps 5-20% of each update (with error feedback); 10% is the usual default.
    "topk": [*_DENSE, _axis("topk_fraction", (0.05, 0.1, 0.2))],
    # head or paper: the majority rules that have helped on validation before (docs/results.md).
    "fedmask": [*_MASK_MAJORITY, _axis("merge", ("head", "paper"))],
    "fedmask-local": _MASK_MAJORITY,
    # fedmask-local's grid: the share is each device's own choice (untuned, it borrows local's trials).
    "fedmask-adapt-local": _MASK_MAJORITY,
    "fedmask-agree": [
        _AGREE_OPT,
        _axis("batch_size", (16, 32)),
        # how far a device moves to the fleet's agreement: a quarter of the way up to all of it
        _axis("share", (0.25, 0.5, 0.75, 1.0)),
        # a personal head only has a learning rate when it exists: three distinct choices, not four
        [{"personal_head": False}, {"personal_head": True, "weight_lr": 1e-3},
         {"personal_head": True, "weight_lr": 1e-2}],
        # 1.0: no pruning, every device holds every element (FedPM)
        _axis("prune_rho", (0.2, 0.5, 1.0)),
        _axis("prune_last_k", (1, 2)),
        _axis("final_local_epochs", (0, 3, 5)),
    ],
    # fedmask-agree's grid without its share: each device chooses that itself, on its own validation.
    "fedmask-adapt": [
        _AGREE_OPT,
        _axis("batch_size", (16, 32)),
        [{"personal_head": False}, {"personal_head": True, "weight_lr": 1e-3},
         {"personal_head": True, "weight_lr": 1e-2}],
        _axis("prune_rho", (0.2, 0.5, 1.0)),
        _axis("prune_last_k", (1, 2)),
        _axis("final_local_epochs", (0, 3, 5)),
    ],
    # FedPM is one global model: only how its scores train is tuned.
    "fedpm": [_AGREE_OPT, _axis("batch_size", (16, 32))],
    # FedDST at S = 0.8 (the target's): the dense optimizers, how much and how often masks move
    # (the paper's R_adj 15 fits 400 rounds; short runs need shorter periods to readjust at all),
    # and the per-layer rule.
    "feddst": [*_DENSE, _axis("alpha", (0.01, 0.05, 0.2)), _axis("readjust_every", (1, 3, 15)),
               _axis("density_rule", ("erk", "uniform"))],
    # ZeroFL at sp 0.9, mr 0.2 (the target's): the dense optimizers and the server's unsent-entry rule.
    "zerofl": [*_DENSE, _axis("unsent", ("zero", "holders", "keep"))],
    # LG-FedAvg: the dense optimizers and how many of the last tensors are shared.
    "lg-fedavg": [*_DENSE, _axis("head_layers", (1, 2))],
    # Per-FedAvg: its own two step sizes (the optimizer is its FO-MAML step) and the batch size.
    "per-fedavg": [_axis("inner_lr", (0.01, 0.03, 0.1)), _axis("outer_lr", (0.001, 0.01, 0.03)),
                   _axis("batch_size", (16, 32))],
    # BNN-FedAvg: the latent weights' optimizer and whether the binary weights carry a scale.
    "bnn-fedavg": [*_DENSE, _axis("bnn_scale", (True, False))],
}


def grid_size(variant: str) -> int:
    return math.prod(len(axis) for axis in GRIDS[variant])


def grid_point(variant: str, base: VariantConfig, index: int) -> VariantConfig:
    """Point `index` of the variant's grid (mixed radix over its axes, the last axis fastest)."""
    changes: Choice = {}
    for axis in reversed(GRIDS[variant]):
        index, pick = divmod(index, len(axis))
        changes.update(axis[pick])
    return base.with_(**changes)


def grid_points(variant: str, base: VariantConfig) -> list[VariantConfig]:
    """Every distinct config of the variant's grid, applied over `base`, in index order."""
    points = (grid_point(variant, base, i) for i in range(grid_size(variant)))
    return list({_key(p): p for p in points}.values())


def draw_trials(variant: str, default: VariantConfig, trials: int, seed: int = TUNE_SEED) -> list[VariantConfig]:
    """`trials` distinct configs: the default first, then grid points in a seeded random order
    (only the drawn points are built: the largest grid has thousands)."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "tune", variant)))
    out, seen = [default], {_key(default)}
    for i in rng.permutation(grid_size(variant)):
        if len(out) == trials:
            break
        cfg = grid_point(variant, default, int(i))
        if _key(cfg) not in seen:
            seen.add(_key(cfg))
            out.append(cfg)
    if len(out) < trials:
        raise ValueError(f"{variant}'s grid has {len(out) - 1} configs besides the default; "
                         f"ask for at most {len(out)} trials")
    return out


@dataclass(frozen=True)
class Trial:
    index: int             # 1-based; trial 1 is the default
    config: VariantConfig
    validation_accuracy: float
    wall_seconds: float

    def to_json(self) -> dict[str, Any]:
        val = self.validation_accuracy
        return {"trial": self.index, "default": self.index == 1, "config": self.config.to_json(),
                "validation_accuracy": val if math.isfinite(val) else None, "wall_seconds": round(self.wall_seconds, 3)}


@dataclass(frozen=True)
class TuningRecord:
    task: str
    partition: dict[str, Any]   # {"key": ..., "partition": ..., "alpha": ..., "holdout": ...}
    variant: str
    budget: dict[str, Any]      # trials, rounds (and the preset's), seed, devices, width, sample_rate
    trials: list[Trial]
    chosen: int                 # index into trials (0-based)

    @property
    def config(self) -> VariantConfig:
        return self.trials[self.chosen].config

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "partition": self.partition, "variant": self.variant, "budget": self.budget,
                "selection": "highest mean validation accuracy over devices; ties keep the earlier trial",
                "trials": [t.to_json() for t in self.trials],
                "chosen": {"trial": self.trials[self.chosen].index, "config": self.config.to_json()}}


class TuneHooks:
    """What a UI can observe; the defaults do nothing (shared/ draws no bars)."""

    def trial_started(self, index: int, trials: int, config: VariantConfig) -> Progress | None:
        return None

    def trial_finished(self, trial: Trial) -> None:
        return None


def choose(trials: list[Trial]) -> int:
    """Index of the best validation accuracy; NaN never wins; the earliest trial wins a tie."""
    scores = [t.validation_accuracy if math.isfinite(t.validation_accuracy) else -math.inf for t in trials]
    return max(range(len(trials)), key=lambda i: (scores[i], -i))


def tune(variant: str, p: TaskPreset, data: FederatedDataset, spec: ModelSpec, *, trials: int = DEFAULT_TRIALS,
         rounds: int | None = None, seed: int = TUNE_SEED, partition: dict[str, Any] | None = None,
         hooks: TuneHooks | None = None, run: Callable[..., SimResult] = run_variant,
         resume: dict[str, Any] | None = None) -> TuningRecord:
    """Random search over the variant's grid on `data` (built with `seed`); returns every trial.
    `run` is run_variant (a test may pass a stand-in). `resume`: an earlier record (its JSON) of
    the same variant, split and budget; its trials whose config is drawn again are reused, not rerun
    (runs are deterministic, so raising --trials from 3 to 8 costs 5 runs, not 8)."""
    hooks = hooks or TuneHooks()
    budget_rounds = rounds or p.rounds
    budget = {"trials": trials, "rounds": budget_rounds, "preset_rounds": p.rounds, "seed": seed,
              "devices": len(data.devices), "width": spec.width, "sample_rate": p.sample_rate}
    default = default_config(variant, p)
    reusable = _reusable_trials(resume, variant, budget, default)
    done: list[Trial] = []
    configs = draw_trials(variant, default, trials, seed)
    for i, cfg in enumerate(configs, start=1):
        if (old := reusable.get(_key(cfg))) is not None:
            done.append(Trial(i, cfg, old.validation_accuracy, old.wall_seconds))
            hooks.trial_finished(done[-1])
            continue
        bar = hooks.trial_started(i, len(configs), cfg)
        start = time.perf_counter()
        r = run(cfg, data, spec, rounds=budget_rounds, sample_rate=p.sample_rate, seed=seed, progress=bar)
        done.append(Trial(i, cfg, float(r.validation_accuracy), time.perf_counter() - start))
        hooks.trial_finished(done[-1])
    part = partition or {"key": None}
    return TuningRecord(data.task, part, variant, budget, done, choose(done))


def _reusable_trials(resume: dict[str, Any] | None, variant: str, budget: dict[str, Any],
                     default: VariantConfig) -> dict[str, Trial]:
    """config key -> trial, from an earlier record whose budget (all but the trial count) matches."""
    if not resume or resume.get("variant") != variant:
        return {}
    same = {k: v for k, v in budget.items() if k != "trials"}
    if {k: resume.get("budget", {}).get(k) for k in same} != same:
        return {}
    out = {}
    for t in resume.get("trials", []):
        val = t.get("validation_accuracy")
        cfg = VariantConfig.from_json(t["config"], default)
        out[_key(cfg)] = Trial(int(t["trial"]), cfg, float("nan") if val is None else float(val),
                               float(t.get("wall_seconds", 0.0)))
    return out


def data_split(task: str, p: TaskPreset, partition: str = "shards", alpha: float = 0.5,
               holdout: str | None = None) -> dict[str, Any]:
    """The data split a tuning file is for; "key" names a non-default one (None: the task's
    default split), e.g. "dirichlet0.5" or "holdout-recording", and is its folder suffix."""
    preset_holdout = p.data_options.get("holdout")
    parts = []
    if partition != "shards" and task in ("mnist", "digits"):
        parts.append(f"{partition}{alpha:g}")
    if task == "activity" and holdout is not None and holdout != (preset_holdout or "recording"):
        parts.append(f"holdout-{holdout}")
    return {"key": "-".join(parts) or None, "partition": partition,
            "alpha": alpha if partition == "dirichlet" else None, "holdout": holdout or preset_holdout}


def tuned_path(task: str, variant: str, partition: str | None = None, root: Path | None = None) -> Path:
    folder = task if partition is None else f"{task}-{partition}"
    return (root or TUNED_DIR) / folder / f"{variant}.json"


def write_record(record: TuningRecord, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n")


@dataclass(frozen=True)
class Tuned:
    config: VariantConfig
    origin: str  # the file it came from, or why the default is used


def load_tuned(task: str, variant: str, p: TaskPreset, partition: str | None = None,
               root: Path | None = None) -> Tuned:
    """The chosen config of the tuning file for (task, partition, variant); else the one tuned on the
    task's default split (a user's other split takes the task's presets, as a new user's would);
    else the variant's default. `.origin` names the file used, or says there was none."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    default = default_config(variant, p)
    path = tuned_path(task, variant, partition, root)
    if not path.exists() and partition is not None:
        path = tuned_path(task, variant, None, root)
    shown = path.relative_to(TUNED_DIR.parents[1]) if path.is_relative_to(TUNED_DIR.parents[1]) else path
    if not path.exists() and variant in BORROWS:
        # fedmask-adapt is fedmask-agree with the share chosen per device: untuned, it takes the other's
        # tuned choices (so it gets that variant's budget, and no more) with its own share grid.
        lender, own = BORROWS[variant]
        other = load_tuned(task, lender, p, partition, root)
        return Tuned(replace(other.config, variant=variant, **{k: getattr(default, k) for k in own}),
                     f"{other.origin}, share chosen per device (no tuning file {shown})")
    if not path.exists():
        return Tuned(default, f"default (no tuning file {shown})")
    raw = json.loads(path.read_text())
    if raw.get("task") != task or raw.get("variant") != variant:
        raise ValueError(f"{path} holds {raw.get('task')}/{raw.get('variant')}, not {task}/{variant}")
    return Tuned(VariantConfig.from_json(raw["chosen"]["config"], default), str(shown))


def changes_from(cfg: VariantConfig, base: VariantConfig) -> dict[str, Any]:
    """The knobs where `cfg` differs from `base` (TrainConfig's fields flattened), for tables."""
    def flat(c: VariantConfig) -> dict[str, Any]:
        raw = c.to_json()
        return {**raw.pop("train"), **raw}

    a, b = flat(cfg), flat(base)
    return {k: v for k, v in a.items() if b.get(k) != v}


def _key(cfg: VariantConfig) -> str:
    return json.dumps(cfg.to_json(), sort_keys=True)
