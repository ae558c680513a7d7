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
@click.option("--api-url", envvar="FEDMASK_DEMO_API_URL", default="http://127.0.0.1:15672", show_default=True,
              help="the broker's management API (same admin user as --amqp-url)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--mode", type=click.Choice(["rounds", "async"]), default="rounds", show_default=True,
              help="rounds: the operator opens rounds; async: the aggregator's --mode async, no rounds")
@click.option("--buffer", "buffer_k", type=click.IntRange(min=1), default=3, show_default=True,
              help="async: flush every K stored updates")
@click.option("--staleness", type=click.Choice(["constant", "sqrt"]), default="sqrt", show_default=True,
              help="async: vote weight by staleness tau: 1, or 1/sqrt(1+tau)")
@click.option("--flushes", type=click.IntRange(min=1), default=12, show_default=True,
              help="async: stop after this many flushes with every board merged (at most --deadline seconds)")
@click.option("--budget", type=click.FloatRange(min=1), default=None,
              help="seconds of training: rounds open no new round after it; async stops the stream then")
@click.option("--compare-modes", is_flag=True,
              help="run sync-all (quorum 1.0), quorum with carry and async (K=3, sqrt) for --budget seconds "
                   "each (default 180) and compare learning over time (out: runs/compare-modes)")
@click.option("--summarize-only", is_flag=True,
              help="with --compare-modes: recompute compare.json/png from the runs an earlier one left in --out")
@strategy_opt
def demo(workers: int, pi4: int, rounds: int, quorum: float, late: str, max_staleness: int, deadline: float,
         seed: int, amqp_url: str, redis_url: str, api_url: str, out: Path, as_json: bool, mode: str, buffer_k: int,
         staleness: str, flushes: int, budget: float | None, compare_modes: bool, summarize_only: bool,
         strategy: str | None) -> None:
    """A mixed Pi 4 / Jetson fleet of worker processes trains FedMask (or, with --strategy, that
    weight-training strategy) on activity data through RabbitMQ and Redis; prints per-device accuracy,
    bytes, round times per profile and late updates, and writes report.json and pipeline.png under --out.
    With --mode async the aggregator tasks each board as soon as it answers and flushes every --buffer
    updates; the report lists the flushes instead of rounds."""
    from ops.demo.report import plot, render_table
    from ops.demo.run import DemoSettings, run_demo

    if mode == "async" and strategy is not None:
        raise click.UsageError("--mode async trains FedMask masks only: drop --strategy (strategies run in rounds)")
    if strategy is not None:  # before any process starts (standalone has no pipeline: the reason)
        from shared.strategy_setup import check_pipeline

        try:
            check_pipeline(strategy)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    s = DemoSettings(workers=workers, pi4=pi4, rounds=rounds, quorum=quorum, late=late, max_staleness=max_staleness,
                     deadline_s=deadline, seed=seed, amqp_url=amqp_url, redis_url=redis_url, api_url=api_url, out=out,
                     strategy=strategy, mode=mode, buffer=buffer_k, staleness=staleness, flushes=flushes,
                     budget_s=budget)

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    if compare_modes:
        _compare(s, budget or 180.0, as_json, say, summarize_only)
        return
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


def _compare(s: Any, budget: float, as_json: bool, say: Any, summarize_only: bool) -> None:
    import dataclasses

    from ops.demo.compare import MODES, compare_modes, default_out, plot_compare, read_runs, render, summarize

    if s.strategy is not None:
        raise click.UsageError("--compare-modes compares FedMask's rhythms: drop --strategy")
    s = dataclasses.replace(s, out=default_out(s.out))
    missing = [m for m in MODES if not (s.out / m / "report.json").exists()]
    if summarize_only and missing:
        raise click.ClickException(f"--summarize-only: no earlier run of {', '.join(missing)} under {s.out}")
    try:
        result = summarize(read_runs(s.out, budget), budget, s) if summarize_only else compare_modes(s, budget, say)
    except FedMaskError as exc:
        raise click.ClickException(f"{exc}\n(logs under {s.out})") from exc
    write_json(s.out / "compare.json", result)
    plot_compare(result, s.out / "compare.png")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(render(result))
    click.echo(f"figures: {s.out / 'compare.json'}, plot {s.out / 'compare.png'}; each mode's report and plot "
               f"under {s.out}/<mode>/")
