"""One entry point for every method, so the CLI and `experiment` treat them alike."""

from __future__ import annotations

from pathlib import Path

from shared.data import FederatedDataset
from shared.device import FedMaskConfig
from shared.models import ModelSpec
from shared.presets import TaskPreset
from shared.sim.baselines import run_baseline
from shared.sim.fedmask import run_fedmask
from shared.sim.result import Progress, SimResult


def run_method(method: str, data: FederatedDataset, spec: ModelSpec, p: TaskPreset, *, rounds: int,
               sample_rate: float, local_epochs: int, seed: int, merge: str, final_local_epochs: int,
               fedmask_cfg: FedMaskConfig, eval_every: int = 0, progress: Progress | None = None,
               save_devices: Path | None = None) -> SimResult:
    if method == "fedmask":
        return run_fedmask(data, spec, fedmask_cfg, rounds=rounds, sample_rate=sample_rate, seed=seed,
                           merge=merge, final_local_epochs=final_local_epochs, eval_every=eval_every,
                           progress=progress, save_dir=save_devices)
    # FedAvg-FT's fine-tune is its own final adaptation; Standalone's budget includes it too.
    ft = local_epochs if method == "fedavg-ft" else 0
    return run_baseline(method, data, spec, p.dense_train, rounds=rounds, sample_rate=sample_rate,
                        local_epochs=local_epochs, seed=seed, eval_every=eval_every, progress=progress,
                        final_local_epochs=final_local_epochs if method == "standalone" else ft)
