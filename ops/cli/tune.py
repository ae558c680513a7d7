"""`fedmask tune`: random search for one variant on one task, scored on validation; writes the
presets file (shared/tuned/<task>[-<partition>]/<variant>.json). And the reader of those files,
`fedmask experiment --variants`: every variant's tuned config over several seeds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ops.cli.common import Bar, build_run
from ops.report import write_spread_report
from shared.presets import tuned_config
from shared.sim.result import Progress, SimResult
from shared.sim.spread import run_seeds
from shared.sim.tuning import (
    DEFAULT_TRIALS,
    TUNE_SEED,
    Trial,
    TuneHooks,
    changes_from,
    data_split,
    tune,
    tuned_path,
    write_record,
)
from shared.sim.variants import VARIANTS, VariantConfig


class _Bars(TuneHooks):
    """One tqdm bar per trial (stderr), closed when the trial ends."""

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
@click.option("--json", "as_json", is_flag=True, help="print the tuning record on stdout")
@click.option("--quiet", is_flag=True, help="no progress bars")
def tune_cmd(task: str, variant: str, partition: str, alpha: float, holdout: str | None, trials: int,
             rounds: int | None, seed: int, devices: int | None, width: int | None, out: Path | None,
             as_json: bool, quiet: bool) -> None:
    """Tune VARIANT on TASK: TRIALS configs from its grid, chosen by validation accuracy."""
    setup = build_run(task, devices, width, seed, partition=partition, alpha=alpha, holdout=holdout)
    p = setup.preset
    part = data_split(task, p, partition, alpha, holdout)
    key = part["key"]
    try:
        record = tune(variant, p, setup.data, setup.spec, trials=trials, rounds=rounds, seed=seed, partition=part,
                      hooks=_Bars(variant, rounds or p.rounds, enabled=not quiet))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    path = out or tuned_path(task, variant, key)
    write_record(record, path)
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    default = record.trials[0].config
    click.echo(f"{variant} on {task}{'-' + key if key else ''}: {trials} trials, "
               f"{record.budget['rounds']} rounds, seed {seed}")
    click.echo(f"{'trial':>5}  {'validation':>10}  {'seconds':>7}  changes from the default")
    for i, t in enumerate(record.trials):
        mark = "*" if i == record.chosen else " "
        diff = " ".join(f"{k}={v}" for k, v in changes_from(t.config, default).items()) or "(default)"
        click.echo(f"{t.index:>4}{mark}  {t.validation_accuracy:>10.4f}  {t.wall_seconds:>7.1f}  {diff}")
    click.echo(f"chosen: trial {record.trials[record.chosen].index}; wrote {path}")


def variants_experiment(task: str, names: list[str], seeds: list[int], out: Path, devices: int | None,
                        width: int | None, rounds: int | None, eval_every: int | None, partition: str, alpha: float,
                        holdout: str | None, quiet: bool) -> None:
    """Each variant's tuned config over every seed; mean +- std, and only the claims the spread supports."""
    if not names or not seeds:
        raise click.UsageError("--variants needs at least one variant and --seeds at least 1")
    setups = {s: build_run(task, devices, width, s, partition=partition, alpha=alpha, holdout=holdout) for s in seeds}
    p = setups[seeds[0]].preset
    key = data_split(task, p, partition, alpha, holdout)["key"]
    configs = {}
    for v in names:
        try:
            tuned = tuned_config(task, v, key)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        configs[v] = (tuned.config, tuned.origin)
        click.echo(f"{v}: {tuned.origin}", err=True)
    rounds = rounds or p.rounds
    every = eval_every or max(1, rounds // 10)
    bars: list[Bar] = []

    def bar_for(variant: str, s: int) -> Bar:
        bars.append(Bar(f"{variant} seed {s}", rounds, enabled=not quiet))
        return bars[-1]

    def done(variant: str, s: int, r: SimResult) -> None:
        bars.pop().close()
        click.echo(f"{variant:16s} seed {s}: test {r.personalized_accuracy:.4f}  validation "
                   f"{r.validation_accuracy:.4f}  comm {(r.uplink_bytes + r.downlink_bytes) / 1e6:.3f} MB", err=True)

    summaries = run_seeds(configs, lambda s: (setups[s].data, setups[s].spec), seeds, rounds=rounds,
                          sample_rate=p.sample_rate, eval_every=every, progress_for=bar_for, on_result=done)
    shape = {"rounds": rounds, "sample_rate": p.sample_rate, "devices": len(setups[seeds[0]].data.devices),
             "width": setups[seeds[0]].spec.width, "partition": key or "default", "seeds": seeds}
    click.echo(write_spread_report(out, task, setups[seeds[0]].data.summary(), summaries, shape))
    click.echo(f"wrote {out}/results.csv, results.md, results.json, accuracy_vs_communication.png")
