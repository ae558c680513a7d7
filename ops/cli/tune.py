"""`fedmask tune`: random search for one variant on one task, scored on validation; writes the
presets file (shared/tuned/<task>[-<partition>]/<variant>.json) that `fedmask experiment --variants`
reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ops.cli.common import Bar, build_run
from ops.engine.variants import tuning_table
from shared.sim.result import Progress
from shared.sim.tuning import DEFAULT_TRIALS, TUNE_SEED, Trial, TuneHooks, data_split, tune, tuned_path, write_record
from shared.sim.variants import VARIANTS, VariantConfig


class _Bars(TuneHooks):
    """One progress bar per trial (stderr), closed when the trial ends."""

    def __init__(self, variant: str, rounds: int, enabled: bool) -> None:
        self.variant, self.rounds, self.enabled = variant, rounds, enabled
        self.bar: Bar | None = None

    def trial_started(self, index: int, trials: int, config: VariantConfig) -> Progress | None:
        self.bar = Bar(f"{self.variant} trial {index}/{trials}", self.rounds, enabled=self.enabled)
        return self.bar

    def trial_finished(self, trial: Trial) -> None:
        if self.bar is not None:
            self.bar.close()
        click.echo(f"trial {trial.index}: validation {trial.validation_accuracy:.4f} "
                   f"({trial.wall_seconds:.1f} s)", err=True)


@click.command("tune")
@click.option("--task", type=click.Choice(["activity", "mnist", "shakespeare", "digits"]), required=True)
@click.option("--method", "variant", type=click.Choice(VARIANTS), required=True, help="the variant to tune")
@click.option("--partition", type=click.Choice(["shards", "dirichlet"]), default="shards", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--holdout", type=click.Choice(["recording", "time"]), default=None, help="activity only")
@click.option("--trials", type=int, default=DEFAULT_TRIALS, show_default=True,
              help="random-search trials (trial 1 is the default config); use the same N for every variant")
@click.option("--rounds", type=int, default=None, help="tuning budget (default: the task preset's rounds)")
@click.option("--seed", type=int, default=TUNE_SEED, show_default=True,
              help="data and run seed; keep it apart from the evaluation seeds 0, 1, 2")
@click.option("--devices", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="default: shared/tuned/<task>[-<partition>]/<variant>.json")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="reuse the trials of the existing file (same budget) instead of rerunning them")
@click.option("--json", "as_json", is_flag=True, help="print the tuning record on stdout")
@click.option("--quiet", is_flag=True, help="no progress bars")
def tune_cmd(task: str, variant: str, partition: str, alpha: float, holdout: str | None, trials: int,
             rounds: int | None, seed: int, devices: int | None, width: int | None, out: Path | None,
             resume: bool, as_json: bool, quiet: bool) -> None:
    """Tune VARIANT on TASK: TRIALS configs from its grid, chosen by validation accuracy."""
    setup = build_run(task, devices, width, seed, partition=partition, alpha=alpha, holdout=holdout)
    p = setup.preset
    part = data_split(task, p, partition, alpha, holdout)
    path = out or tuned_path(task, variant, part["key"])
    earlier = json.loads(path.read_text()) if resume and path.exists() else None
    try:
        record = tune(variant, p, setup.data, setup.spec, trials=trials, rounds=rounds, seed=seed, partition=part,
                      hooks=_Bars(variant, rounds or p.rounds, enabled=not quiet), resume=earlier)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    write_record(record, path)
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    for line in tuning_table(record, path):
        click.echo(line)

