"""`fedmask demo`: the pipeline end to end on this machine (what `make demo` runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ops.cli.common import write_json
from ops.cli.pipeline import strategy_opt
from shared.errors import FedMaskError


@click.command("demo")
@click.option("--workers", type=int, default=10, show_default=True, help="worker processes (one device each)")
@click.option("--pi4", type=int, default=3, show_default=True, help="how many of them emulate a Pi 4 (5x slower)")
@click.option("--rounds", type=int, default=12, show_default=True)
@click.option("--quorum", type=float, default=0.7, show_default=True)
@click.option("--late", type=click.Choice(["drop", "carry"]), default="carry", show_default=True)
@click.option("--max-staleness", type=int, default=10, show_default=True,
              help="rounds a late update may be carried (a Pi 4 task spans about 8 rounds here)")
@click.option("--deadline", type=float, default=300.0, show_default=True, help="seconds per round")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--amqp-url", envvar="FEDMASK_DEMO_AMQP_URL", default="amqp://guest:guest@127.0.0.1:5672/",
              show_default=True, help="an admin URL; the demo uses its own vhost fedmask-demo")
@click.option("--redis-url", envvar="FEDMASK_DEMO_REDIS_URL", default="redis://127.0.0.1:6379/1", show_default=True,
              help="a Redis database the demo resets (never db 0)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@strategy_opt
def demo(workers: int, pi4: int, rounds: int, quorum: float, late: str, max_staleness: int, deadline: float,
         seed: int, amqp_url: str, redis_url: str, out: Path, as_json: bool, strategy: str | None) -> None:
    """A mixed Pi 4 / Jetson fleet of worker processes trains FedMask (or, with --strategy, that
    weight-training strategy) on activity data through RabbitMQ and Redis; prints per-device accuracy,
    bytes, round times per profile and late updates, and writes report.json and pipeline.png under --out."""
    from ops.demo.report import plot, render_table
    from ops.demo.run import DemoSettings, run_demo

    s = DemoSettings(workers=workers, pi4=pi4, rounds=rounds, quorum=quorum, late=late, max_staleness=max_staleness,
                     deadline_s=deadline, seed=seed, amqp_url=amqp_url, redis_url=redis_url, out=out,
                     strategy=strategy)

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        report: dict[str, Any] = run_demo(s, say)
    except FedMaskError as exc:
        raise click.ClickException(f"{exc}\n(logs: {out}/logs, {out}/services/aggregator.log)") from exc
    write_json(out / "report.json", report)
    plot(report, out / "pipeline.png")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_table(report))
    click.echo(f"report: {out / 'report.json'}, plot: {out / 'pipeline.png'}, logs: {out / 'logs'}")
