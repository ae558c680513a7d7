"""`fedmask simulate`: one method on one task, no broker, the pipeline's own round logic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ops.cli.common import Bar, build_run, write_json
from shared.device import FedMaskConfig
from shared.merge_rules import RULES
from shared.sim.baselines import METHODS as BASELINES
from shared.sim.runner import run_method
from shared.sim.variants import VARIANTS

METHODS = ("fedmask", *BASELINES)


@click.command()
@click.option("--task", type=click.Choice(["activity", "mnist", "shakespeare", "digits"]), default="activity",
              show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="fedmask", show_default=True)
@click.option("--variant", type=click.Choice(VARIANTS), default=None,
              help="run a named variant with its tuned config (shared/tuned/); replaces --method and the "
                   "training flags")
@click.option("--via-strategy", is_flag=True,
              help="with --variant (the FedMask family and the dense baselines): run it through the strategy "
                   "interface (shared/strategies/) instead of its own path: the same results, bytes of "
                   "strategy messages")
@click.option("--set", "overrides", multiple=True, metavar="KNOB=VALUE",
              help="with --variant: change one knob of its tuned config for this run (repeatable; VALUE is "
                   "read as JSON, else as text), e.g. --set local_epochs=15 --set batch_size=4")
@click.option("--merge", type=click.Choice(sorted(RULES)), default=None, help="merge rule (default: the task preset's)")
@click.option("--arch", type=click.Choice(["mlp", "cnn", "char_lstm"]), default=None)
@click.option("--width", type=int, default=None, help="hidden width (default: the task preset's)")
@click.option("--devices", type=int, default=None)
@click.option("--rounds", type=int, default=None)
@click.option("--sample-rate", type=float, default=None)
@click.option("--local-epochs", type=int, default=None)
@click.option("--final-local-epochs", type=int, default=None,
              help="local adaptation before evaluation (FedMask and FedAvg-FT alike)")
@click.option("--partition", type=click.Choice(["shards", "dirichlet"]), default="shards", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--holdout", type=click.Choice(["recording", "time"]), default=None,
              help="activity only: test on an unseen recording (the other arm) or on a later time slice")
@click.option("--lam", type=float, default=None,
              help="structured-sparsity weight (group lasso); larger = smaller, faster export, lower accuracy")
@click.option("--coding", type=click.Choice(["raw", "delta"]), default="raw", show_default=True,
              help="FedMask wire coding: raw structure bits, or delta: each mask as its range-coded change "
                   "against a mask the receiver holds (lossless: same masks, fewer bytes)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=0, help="evaluate every N rounds (for curves)")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--save-devices", type=click.Path(path_type=Path), default=None,
              help="write each FedMask device's state here (input to `fedmask export`)")
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
@click.option("--quiet", is_flag=True, help="no progress bar")
def simulate(task: str, method: str, variant: str | None, via_strategy: bool, overrides: tuple[str, ...],
             merge: str | None, arch: str | None,
             width: int | None,
             devices: int | None, rounds: int | None, sample_rate: float | None, local_epochs: int | None,
             final_local_epochs: int | None, partition: str, alpha: float, holdout: str | None, lam: float | None,
             coding: str, seed: int,
             eval_every: int,
             json_out: Path | None, save_devices: Path | None, as_json: bool, quiet: bool) -> None:
    """Simulate federated training of METHOD on TASK over the in-memory transport."""
    if overrides and variant is None:
        raise click.UsageError("--set changes a named variant's tuned config: give --variant too")
    knobs = parse_overrides(overrides)
    setup = build_run(task, devices, width, seed, arch, partition, alpha, holdout)
    p = setup.preset
    rounds = rounds or p.rounds
    bar = Bar(f"{variant or method} {task}", rounds, enabled=not quiet)
    if via_strategy and variant is None:
        raise click.UsageError("--via-strategy runs a named variant: give --variant too")
    try:
        if variant is not None:
            from ops.engine.variants import run_tuned_variant

            result = run_tuned_variant(task, variant, setup.data, setup.spec, p, partition, alpha, holdout,
                                       rounds=rounds, sample_rate=sample_rate, seed=seed, eval_every=eval_every,
                                       progress=bar, save_devices=save_devices, via_strategy=via_strategy,
                                       say=lambda line: click.echo(line, err=True), overrides=knobs)
        else:
            result = run_method(
                method, setup.data, setup.spec, p, rounds=rounds,
                sample_rate=sample_rate if sample_rate is not None else p.sample_rate,
                local_epochs=local_epochs or p.local_epochs, seed=seed, merge=merge or p.merge,
                final_local_epochs=final_local_epochs if final_local_epochs is not None else p.final_local_epochs,
                eval_every=eval_every, progress=bar, save_devices=save_devices,
                fedmask_cfg=FedMaskConfig(train=p.mask_train if lam is None else p.mask_train.with_(lam=lam),
                                          local_epochs=local_epochs or p.local_epochs, coding=coding))
    except ValueError as exc:  # an unknown knob of --set, or a value the knob refuses
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    payload = result.to_json()
    write_json(json_out, payload)
    if as_json:
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(f"{result.method}{'/' + result.merge if result.merge else ''} on {task}: "
               f"personalized accuracy {result.personalized_accuracy:.4f} over {result.devices} devices "
               f"(validation {result.validation_accuracy:.4f})")
    per_mask = result.extra.get("downlink_bits_per_param")  # FedMask only
    click.echo(f"  uplink {result.uplink_bytes / 1e6:.3f} MB "
               f"({result.uplink_bits_per_param:.3f} bits/param per update), "
               f"downlink {result.downlink_bytes / 1e6:.3f} MB"
               + (f" ({per_mask:.3f} bits/param per merged mask)" if per_mask is not None else "") +
               f", device training {result.train_seconds:.1f} s, wall {result.wall_seconds:.1f} s")
    if json_out:
        click.echo(f"  wrote {json_out}")


def parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """`KNOB=VALUE` pairs; VALUE as JSON (numbers, true/false, lists), else the text itself."""
    out: dict[str, Any] = {}
    for item in items:
        knob, sep, raw = item.partition("=")
        if not sep or not knob.strip():
            raise click.UsageError(f"--set takes KNOB=VALUE, got {item!r}")
        try:
            out[knob.strip()] = json.loads(raw)
        except ValueError:
            out[knob.strip()] = raw
    return out
