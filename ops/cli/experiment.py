"""`fedmask experiment`: every method on one task, a table and the accuracy-vs-communication plot."""

from __future__ import annotations

from pathlib import Path

import click

from ops.cli.common import Bar, build_run
from shared.sim.tuning import data_split


@click.command()
@click.option("--task", type=click.Choice(["activity", "mnist", "shakespeare", "digits"]), required=True)
@click.option("--methods", default="fedmask,fedavg,fedavg-ft,standalone,topk", show_default=True)
@click.option("--merges", default="head,paper", show_default=True, help="FedMask merge rules to run (one row each)")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--devices", type=int, default=None)
@click.option("--rounds", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--final-local-epochs", type=int, default=None)
@click.option("--eval-every", type=int, default=None, help="default: about 10 points per curve")
@click.option("--holdout", type=click.Choice(["recording", "time"]), default=None, help="activity only")
@click.option("--lam", type=float, default=None,
              help="structured-sparsity weight (group lasso); larger = smaller, faster export, lower accuracy")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-devices", type=click.Path(path_type=Path), default=None,
              help="save the first FedMask run's device states here (input to `fedmask export`)")
@click.option("--variants", default=None, help="named variants (tuned configs) over --seeds seeds, e.g. "
              "fedmask,fedmask-agree,fedpm,fedavg-ft; replaces --methods/--merges")
@click.option("--seeds", type=int, default=3, show_default=True, help="with --variants: seeds --seed .. --seed+N-1")
@click.option("--partition", type=click.Choice(["shards", "dirichlet"]), default="shards", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--quiet", is_flag=True)
def experiment(task: str, methods: str, merges: str, out: Path, devices: int | None, rounds: int | None,
               width: int | None, final_local_epochs: int | None, eval_every: int | None, holdout: str | None,
               lam: float | None, seed: int, save_devices: Path | None, variants: str | None, seeds: int,
               partition: str, alpha: float, quiet: bool) -> None:
    """Run METHODS on TASK; write results.csv, results.md, results.json, accuracy_vs_communication.png."""
    if variants:
        if final_local_epochs is not None or lam is not None or save_devices is not None:
            raise click.UsageError("--variants runs each variant's tuned config: drop --final-local-epochs, "
                                   "--lam and --save-devices (tune them with `fedmask tune`)")
        names = [v.strip() for v in variants.split(",") if v.strip()]
        if not names or seeds < 1:
            raise click.UsageError("--variants needs at least one variant and --seeds at least 1")
        from ops.engine.variants import run_variants, tuned_configs

        setups = {s: build_run(task, devices, width, s, partition=partition, alpha=alpha, holdout=holdout)
                  for s in range(seed, seed + seeds)}
        p = setups[seed].preset
        key = data_split(task, p, partition, alpha, holdout)["key"]
        try:
            configs = tuned_configs(task, names, key, say=lambda line: click.echo(line, err=True))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        total = rounds or p.rounds
        click.echo(run_variants(task, configs, {s: (r.data, r.spec) for s, r in setups.items()}, p,
                                partition_key=key, rounds=total, eval_every=eval_every or max(1, total // 10),
                                out=out, progress=lambda label: Bar(label, total, enabled=not quiet),
                                say=lambda line: click.echo(line, err=True)))
        click.echo(f"wrote {out}/results.csv, results.md, results.json, accuracy_vs_communication.png")
        return
    from ops.engine.experiment import planned_runs, run_experiment, write_results

    setup = build_run(task, devices, width, seed, partition=partition, alpha=alpha, holdout=holdout)
    p = setup.preset
    rounds = rounds or p.rounds
    results = run_experiment(
        setup.data, setup.spec, p, planned_runs(methods, merges), rounds=rounds,
        eval_every=eval_every or max(1, rounds // 10),
        final_local_epochs=final_local_epochs if final_local_epochs is not None else p.final_local_epochs,
        mask_train=p.mask_train if lam is None else p.mask_train.with_(lam=lam), seed=seed, save_devices=save_devices,
        progress=lambda label: Bar(label, rounds, enabled=not quiet), say=lambda line: click.echo(line, err=True))
    click.echo(write_results(out, task, results, setup.data.summary()))
    click.echo(f"wrote {out}/results.csv, results.md, results.json, accuracy_vs_communication.png")
