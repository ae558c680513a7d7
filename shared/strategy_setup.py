"""What both sides of the pipeline run for a weight-training strategy (issue 12): one function, so the
aggregator (`fedmask aggregator run --strategy S`) and the boards (`fedmask worker --strategy S`) build
the same model and the same settings as the simulator's `run_variant` does for that variant.

The settings come from the variant's tuning file when shared/tuned/ has one (shared.presets.tuned_config),
else the variant's defaults; `origin` says which. `fingerprint` digests the strategy, the model and
every setting: a board's hello carries it, and the aggregator refuses a board whose digest differs
(`wrong_model`), because a board training with another learning rate or sparsity than the server
assumes would fold in silently wrong updates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from shared.models import ModelSpec
from shared.presets import model_spec, preset, tuned_config
from shared.sim.variants import STRATEGY_VARIANTS
from shared.strategies.base import StrategyConfig

# fedavg and topk are dense baseline variants in the simulator's tables and strategies here (each equal
# to its baseline, device for device: tests/unit/test_strategies.py, tests/unit/test_baseline_strategies.py).
# fedmask runs the tuned fedmask variant's settings (VariantConfig.fedmask_strategy_config).
PIPELINE_STRATEGIES = ("fedavg", "topk", *STRATEGY_VARIANTS, "fedmask")
# Strategies with no pipeline, and why (`fedmask aggregator run --strategy S` and `fedmask worker` say it).
NO_PIPELINE = {
    "standalone": "standalone devices train on their own data only and send nothing, so there is nothing to "
                  "aggregate; `fedmask simulate --variant standalone` runs it",
}


@dataclass(frozen=True)
class StrategySetup:
    name: str
    spec: ModelSpec
    cfg: StrategyConfig
    origin: str
    rounds: int  # the run's planned length: FedDST anneals alpha over it (the server half only)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"strategy": self.name, "spec": repr(self.spec), "cfg": asdict(self.cfg)},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def describe(self) -> str:
        return f"strategy {self.name} ({self.origin}; {self.rounds} planned rounds)"


def strategy_setup(task: str, name: str, *, width: int | None = None, seed: int = 0,
                   rounds: int | None = None) -> StrategySetup:
    """The model and settings of strategy `name` on `task`; ValueError naming the choices otherwise."""
    check_pipeline(name)
    tuned = tuned_config(task, name)
    cfg = tuned.config.fedmask_strategy_config() if name == "fedmask" else tuned.config.strategy_config()
    planned = rounds if rounds is not None else preset(task).rounds
    return StrategySetup(name, model_spec(task, width=width, seed=seed), cfg, tuned.origin, planned)


def check_pipeline(name: str) -> None:
    """ValueError, with the reason when there is one (NO_PIPELINE), unless `name` runs in the pipeline."""
    if name not in PIPELINE_STRATEGIES:
        why = f": {NO_PIPELINE[name]}" if name in NO_PIPELINE else ""
        raise ValueError(f"strategy {name!r} has no pipeline{why}; choose one of {', '.join(PIPELINE_STRATEGIES)}")


def config_fields(name: str, cfg: StrategyConfig) -> Mapping[str, str]:
    """The fm:config entries that rebuild the device half (worker/strategy_runtime.py): the strategy
    and its settings."""
    return {"strategy": name, "strategy_config": json.dumps(asdict(cfg), sort_keys=True)}
