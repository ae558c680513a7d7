"""`fedmask bench capacity`: is it the network or the federation? (shared/sim/pooled.py)"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ops.cli.bench import bench
from ops.cli.common import build_run, write_json
from ops.cli.progress import Progress
from shared.presets import tuned_config
from shared.sim.pooled import train_pooled
from shared.sim.result import clean_json
from shared.sim.spread import mean_std
from shared.sim.tuning import data_split

DEFAULT_VARIANTS = "fedmask-local,fedpm,fedavg"


@bench.command("capacity")
@click.option("--task", type=click.Choice(["activity", "mnist", "shakespeare", "digits"]), default="mnist",
              show_default=True)
@click.option("--partition", type=click.Choice(["shards", "dirichlet"]), default="shards", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--holdout", type=click.Choice(["recording", "time"]), default=None, help="activity only")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True,
              help="whose tuned training to use: FedMask-family variants train one mask, dense ones the weights")
@click.option("--epochs", type=int, default=20, show_default=True,
              help="passes over the pooled data (the epoch is chosen on validation)")
@click.option("--seeds", default="0,1,2", show_default=True, help="data and model seeds")
@click.option("--json-out", type=click.Path(), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
def capacity(task: str, partition: str, alpha: float, holdout: str | None, variants: str, epochs: int, seeds: str,
             json_out: str | None, as_json: bool) -> None:
    """Train each variant's model on ALL devices' training data pooled (no federation) and report its
    test accuracy (mean over devices) at the epoch pooled validation chooses: the ceiling a single
    global model of that kind reaches on this split. If the pooled mask matches the pooled dense
    network, a federated mask method's gap to the dense baselines is lost in federation, not capacity."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    if not names or not seed_list:
        raise click.UsageError("give at least one variant and one seed")
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for seed in seed_list:
        setup = build_run(task, None, None, seed, None, partition, alpha, holdout)
        for v in names:
            try:
                key = data_split(task, setup.preset, partition, alpha, holdout)["key"]
                cfg = tuned_config(task, v, key).config
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
            bar = Progress(epochs, f"{v} seed {seed}", "epoch", stream=sys.stderr, leave=False)
            try:
                r = train_pooled(cfg, setup.data, setup.spec, epochs=epochs, seed=seed,
                                 on_epoch=lambda done, _total, bar=bar: bar.set_n(done))
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
            finally:
                bar.close()
            rows[v].append({"seed": seed, "epoch": r.chosen_epoch, "validation": r.validation_accuracy,
                            "test": r.test_accuracy, "seconds": r.seconds, "curve": r.curve})
            click.echo(f"{v:16s} seed {seed}: test {r.test_accuracy:.4f} (validation {r.validation_accuracy:.4f}, "
                       f"epoch {r.chosen_epoch}, {r.seconds:.0f} s)", err=True)
    summary = {v: dict(zip(("mean", "std"), mean_std([row["test"] for row in rs]), strict=True))
               for v, rs in rows.items()}
    result = {"task": task, "partition": partition, "alpha": alpha if partition == "dirichlet" else None,
              "holdout": holdout, "epochs": epochs, "seeds": seed_list, "summary": summary, "runs": rows}
    write_json(Path(json_out) if json_out else None, clean_json(result))
    if as_json:
        click.echo(json.dumps(clean_json(result), indent=2))
        return
    split = partition + (f" alpha={alpha}" if partition == "dirichlet" else "")
    click.echo(f"pooled training on {task} ({split}), {len(seed_list)} seed(s), up to {epochs} epochs:")
    for v, s in summary.items():
        click.echo(f"  {v:16s} test {s['mean']:.4f} ± {s['std']:.4f}")
