"""Named variants (shared/sim/variants.py) away from the command line: `fedmask experiment --variants`
runs each one's tuned config over several seeds and writes the spread report; `fedmask tune`'s
summary is a tuning record as a table. The CLI builds the data and the progress bars and prints."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ops.engine.experiment import ProgressBar
from ops.engine.report import write_spread_report
from shared.data import FederatedDataset
from shared.models import ModelSpec
from shared.presets import TaskPreset, tuned_config
from shared.sim.result import Progress, SimResult
from shared.sim.spread import run_seeds
from shared.sim.tuning import TuningRecord, changes_from, data_split
from shared.sim.variants import VariantConfig, run_variant


def tuned_configs(task: str, names: Sequence[str], partition_key: str | None,
                  say: Callable[[str], None]) -> dict[str, tuple[VariantConfig, str]]:
    """name -> (config, where it came from): the variant's presets file for this data split, else its
    default (shared.presets.tuned_config). ValueError for an unknown variant or an unusable file."""
    configs: dict[str, tuple[VariantConfig, str]] = {}
    for v in names:
        tuned = tuned_config(task, v, partition_key)
        configs[v] = (tuned.config, tuned.origin)
        say(f"{v}: {tuned.origin}")
    return configs


def run_tuned_variant(task: str, variant: str, data: FederatedDataset, spec: ModelSpec, p: TaskPreset,
                      partition: str, alpha: float, holdout: str | None, *, rounds: int, sample_rate: float | None,
                      seed: int, eval_every: int, progress: Progress | None, save_devices: Path | None,
                      say: Callable[[str], None], via_strategy: bool = False,
                      overrides: Mapping[str, Any] | None = None) -> SimResult:
    """One run of a variant with the presets `fedmask tune` chose for this split (`fedmask simulate
    --variant`); `say` reports which presets file was used. `overrides` (`--set KNOB=VALUE`) change
    named knobs of that config for this run (VariantConfig.with_: ValueError for an unknown knob);
    the result's config records them, and nothing is written to the presets."""
    key = data_split(task, p, partition, alpha, holdout)["key"]
    cfg, _ = tuned_configs(task, [variant], key, say)[variant]
    if overrides:
        cfg = cfg.with_(**overrides)
        say(f"{variant}: this run changes {', '.join(f'{k}={v!r}' for k, v in sorted(overrides.items()))}")
    return run_variant(cfg, data, spec, rounds=rounds, sample_rate=p.sample_rate if sample_rate is None
                       else sample_rate, seed=seed, eval_every=eval_every, progress=progress,
                       save_devices=save_devices, via_strategy=via_strategy)


def run_variants(task: str, configs: dict[str, tuple[VariantConfig, str]],
                 setups: Mapping[int, tuple[FederatedDataset, ModelSpec]], p: TaskPreset, *,
                 partition_key: str | None, rounds: int, eval_every: int, out: Path,
                 progress: Callable[[str], ProgressBar], say: Callable[[str], None]) -> str:
    """Every variant (name -> (config, origin), see tuned_configs) on every seed in `setups` (seed ->
    that seed's data and model); writes the spread report into `out` (mean ± std, and only the claims
    the spread supports) and returns its markdown."""
    seeds = list(setups)
    bars: list[ProgressBar] = []

    def bar_for(variant: str, seed: int) -> ProgressBar:
        bars.append(progress(f"{variant} seed {seed}"))
        return bars[-1]

    def done(variant: str, seed: int, r: SimResult) -> None:
        bars.pop().close()
        say(f"{variant:16s} seed {seed}: test {r.personalized_accuracy:.4f}  validation "
            f"{r.validation_accuracy:.4f}  comm {(r.uplink_bytes + r.downlink_bytes) / 1e6:.3f} MB")

    summaries = run_seeds(configs, lambda s: setups[s], seeds, rounds=rounds, sample_rate=p.sample_rate,
                          eval_every=eval_every, progress_for=bar_for, on_result=done)
    data, spec = setups[seeds[0]]
    shape = {"rounds": rounds, "sample_rate": p.sample_rate, "devices": len(data.devices), "width": spec.width,
             "partition": partition_key or "default", "seeds": seeds}
    return write_spread_report(out, task, data.summary(), summaries, shape)


def tuning_table(record: TuningRecord, path: Path) -> list[str]:
    """A tuning record as lines: every trial's validation accuracy and how its config differs from the
    default (trial 1); the chosen trial is starred. `path` is where the record was written."""
    key = record.partition["key"]
    default = record.trials[0].config
    lines = [f"{record.variant} on {record.task}{'-' + key if key else ''}: {record.budget['trials']} trials, "
             f"{record.budget['rounds']} rounds, seed {record.budget['seed']}",
             f"{'trial':>5}  {'validation':>10}  {'seconds':>7}  changes from the default"]
    for i, t in enumerate(record.trials):
        mark = "*" if i == record.chosen else " "
        diff = " ".join(f"{k}={v}" for k, v in changes_from(t.config, default).items()) or "(default)"
        lines.append(f"{t.index:>4}{mark}  {t.validation_accuracy:>10.4f}  {t.wall_seconds:>7.1f}  {diff}")
    lines.append(f"chosen: trial {record.trials[record.chosen].index}; wrote {path}")
    return lines
