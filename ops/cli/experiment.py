"""`fedmask experiment`: every method on one task, a table and the accuracy-vs-communication plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click

from ops.cli.common import Bar, build_run
from ops.cli.tune import variants_experiment
from shared.device import FedMaskConfig
from shared.sim.result import SimResult
from shared.sim.runner import run_method


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
        variants_experiment(task, names, list(range(seed, seed + seeds)), out, devices, width, rounds,
                            eval_every, partition, alpha, holdout, quiet)
        return
    setup = build_run(task, devices, width, seed, partition=partition, alpha=alpha, holdout=holdout)
    p = setup.preset
    rounds = rounds or p.rounds
    every = eval_every or max(1, rounds // 10)
    final = final_local_epochs if final_local_epochs is not None else p.final_local_epochs
    runs: list[tuple[str, str | None]] = []
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        runs += [(m, rule.strip()) for rule in merges.split(",")] if m == "fedmask" else [(m, None)]
    mask_train = p.mask_train if lam is None else p.mask_train.with_(lam=lam)
    results: list[SimResult] = []
    saved = False
    for method, rule in runs:
        label = f"{method}[{rule}]" if rule else method
        bar = Bar(label, rounds, enabled=not quiet)
        try:
            r = run_method(method, setup.data, setup.spec, p, rounds=rounds, sample_rate=p.sample_rate,
                           local_epochs=p.local_epochs, seed=seed, merge=rule or p.merge,
                           final_local_epochs=final, eval_every=every, progress=bar,
                           save_devices=save_devices if method == "fedmask" and not saved else None,
                           fedmask_cfg=FedMaskConfig(train=mask_train, local_epochs=p.local_epochs))
        finally:
            bar.close()
        click.echo(f"{label:22s} accuracy {r.personalized_accuracy:.4f}  "
                   f"comm {(r.uplink_bytes + r.downlink_bytes) / 1e6:10.3f} MB", err=True)
        results.append(r)
        saved = saved or method == "fedmask"
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in results]
    _write_csv(out / "results.csv", rows)
    (out / "results.md").write_text(_markdown(task, rows, setup.data.summary()))
    (out / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    _plot(out / "accuracy_vs_communication.png", task, results)
    click.echo((out / "results.md").read_text())
    click.echo(f"wrote {out}/results.csv, results.md, results.json, accuracy_vs_communication.png")


def _row(r: SimResult) -> dict[str, Any]:
    return {
        "method": f"{r.method}[{r.merge}]" if r.merge else r.method,
        "personalized_accuracy": round(r.personalized_accuracy, 4),
        "validation_accuracy": round(r.validation_accuracy, 4),
        "uplink_MB": round(r.uplink_bytes / 1e6, 4),
        "downlink_MB": round(r.downlink_bytes / 1e6, 4),
        "uplink_bits_per_param": round(r.uplink_bits_per_param, 4),
        "train_seconds": round(r.train_seconds, 2),
        "params": r.params,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _markdown(task: str, rows: list[dict[str, Any]], summary: str) -> str:
    cols = list(rows[0])
    lines = [f"# {task}", "", summary, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(path: Path, task: str, results: list[SimResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        pts = [(h["uplink_mb"] + h["downlink_mb"], h["accuracy"]) for h in r.history if "accuracy" in h]
        label = f"{r.method}[{r.merge}]" if r.merge else r.method
        total_mb = (r.uplink_bytes + r.downlink_bytes) / 1e6
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=color, label=label)
        elif total_mb == 0:
            label += " (no communication; drawn at 1 kB)"
        # a log axis has no 0: methods that send nothing are drawn at 1 kB, and say so in the legend
        ax.scatter([max(total_mb, 1e-3)], [r.personalized_accuracy], marker="*", s=110, color=color,
                   label=None if pts else label, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative communication, uplink + downlink (MB, log scale)")
    ax.set_ylabel("mean personalized test accuracy")
    ax.set_title(f"{task}: accuracy vs communication (stars: final, after any local adaptation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
