"""`fedmask bench`: benchmarks kept out of the test suite."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from ops.bench.merge_kernel import run_aggregate_bench
from ops.bench.report import format_aggregate
from ops.cli.common import write_json
from ops.cli.pipeline import VARIANTS
from ops.cli.progress import Progress


@click.group()
def bench() -> None:
    """Benchmarks (long; not part of `make test`)."""


@bench.command("aggregate")
@click.option("--devices", type=int, default=20, show_default=True)
@click.option("--params", type=int, default=15_000_000, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def aggregate(devices: int, params: int, repeats: int, seed: int, as_json: bool) -> None:
    """Merge kernel vs the naive reference (np.unpackbits, integer sums), same inputs, same run."""
    if not as_json:
        click.echo(f"merging {devices} devices x {params:,} params, best of {repeats} ...", err=True)
    r = run_aggregate_bench(devices=devices, params=params, repeats=repeats, seed=seed)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(format_aggregate(r))


# -- pipeline benchmarks: emulated devices through the real RabbitMQ and Redis (ops/bench/) --------

_BENCH_REDIS = "redis://127.0.0.1:6379/14"


def _service_options(fn: Any) -> Any:
    """Where the services are; each run works in a throwaway vhost and a Redis database of its own."""
    fn = click.option("--api-url", default="http://127.0.0.1:15672", show_default=True,
                      help="RabbitMQ management API (same admin user as --amqp-url)")(fn)
    fn = click.option("--redis-url", default=_BENCH_REDIS, show_default=True,
                      help="a database the benchmark may fill and empty (refused if it holds fm:* keys)")(fn)
    fn = click.option("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/", show_default=True,
                      help="admin user; a throwaway vhost replaces the URL's vhost")(fn)
    return fn


def _finish(result: dict[str, Any], text: str, as_json: bool, out: Path | None) -> None:
    write_json(out, result)
    click.echo(json.dumps(result, indent=2) if as_json else text)
    if result["problems"]:
        sys.exit(1)  # a vanished message or a wrong downlink is a failure, not a figure


@bench.command("pipeline")
@click.option("--devices", type=int, default=100, show_default=True)
@click.option("--params", type=int, default=1_000_000, show_default=True, help="model size (an mlp of that size)")
@click.option("--rounds", type=int, default=20, show_default=True, help="rounds timed for close latency")
@click.option("--task", type=click.Choice(["activity", "mnist", "digits"]), default="activity", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="(ingest, raw) pairs; the median is reported")
@click.option("--profile", is_flag=True, help="cProfile the aggregator's handler during the ingest round")
@click.option("--durability", type=click.Choice(["always", "everysec", "both"]), default=None,
              help="run against a redis-server of its own with this appendfsync (both: one run each, the fsync "
                   "cost of durable acks); instead of --redis-url")
@click.option("--prefetch", type=click.IntRange(min=1), default=None,
              help="the aggregator's prefetch (and the raw consumer's) [default: the service's]")
@click.option("--replicas", type=click.IntRange(min=0), default=0,
              help="also measure ingest with 1 and with this many aggregator processes on one queue (>= 2)")
@_service_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write the figures (JSON)")
def pipeline(devices: int, params: int, rounds: int, task: str, seed: int, repeats: int, profile: bool,
             durability: str | None, prefetch: int | None, replicas: int, amqp_url: str, redis_url: str,
             api_url: str, as_json: bool, out: Path | None) -> None:
    """Aggregator ingest rate vs the broker's raw rate, and round close latency (emulated devices)."""
    from ops.bench.pipeline import PipelineBenchConfig, run_pipeline_bench
    from ops.bench.report import format_durability, format_pipeline
    from shared.errors import FedMaskError

    cfg = PipelineBenchConfig(devices=devices, params=params, rounds=rounds, task=task, seed=seed, profile=profile,
                              ingest_repeats=repeats, amqp_url=amqp_url, redis_url=redis_url, api_url=api_url,
                              durability=durability or "", replicas=replicas,
                              **({"prefetch": prefetch} if prefetch else {}))
    bar = Progress(rounds * (2 if durability == "both" else 1), "close latency", "round", stream=sys.stderr,
                   leave=False)
    try:
        result = run_pipeline_bench(cfg, on_round=lambda _i, s: (bar.set_postfix_str(f"close {s:.3f}s"), bar.update()))
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    _finish(result, format_durability(result) if durability else format_pipeline(result), as_json, out)


@bench.command("load")
@click.option("--devices", type=int, default=500, show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True)
@click.option("--params", type=int, default=20_000, show_default=True)
@click.option("--sample-rate", type=float, default=0.5, show_default=True)
@click.option("--quorum", type=float, default=0.8, show_default=True)
@click.option("--deadline", type=float, default=10.0, show_default=True, help="seconds per round")
@click.option("--bad-rate", type=float, default=0.02, show_default=True,
              help="injected bad messages per valid update (duplicate, wrong length, not sampled, undecodable)")
@click.option("--seed", type=int, default=0, show_default=True)
@_service_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write the figures (JSON)")
def load(devices: int, rounds: int, params: int, sample_rate: float, quorum: float, deadline: float,
         bad_rate: float, seed: int, amqp_url: str, redis_url: str, api_url: str, as_json: bool,
         out: Path | None) -> None:
    """Many emulated devices vs the aggregator process: throughput, close latency, peak memory,
    and an exact accounting of every update (exit 1 if any vanished)."""
    from ops.bench.load import LoadBenchConfig, run_load_bench
    from ops.bench.report import format_load
    from shared.errors import FedMaskError

    cfg = LoadBenchConfig(devices=devices, rounds=rounds, params=params, sample_rate=sample_rate, quorum=quorum,
                          deadline=deadline, bad_rate=bad_rate, seed=seed, amqp_url=amqp_url, redis_url=redis_url,
                          api_url=api_url)
    bar = Progress(rounds, "rounds", "round", stream=sys.stderr, leave=False)
    try:
        result = run_load_bench(cfg, on_round=lambda _i, s: (bar.set_postfix_str(f"close {s:.3f}s"), bar.update()))
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    _finish(result, format_load(result), as_json, out)


@bench.command("decoupling")
@click.option("--devices", type=int, default=10, show_default=True)
@click.option("--pi4", type=int, default=3, show_default=True, help="emulated Pi 4 boards (5x slower)")
@click.option("--rounds", type=int, default=8, show_default=True)
@click.option("--quorum", type=float, default=0.7, show_default=True)
@click.option("--late", type=click.Choice(["drop", "carry"]), default="carry", show_default=True)
@click.option("--amqp-url", envvar="FEDMASK_DEMO_AMQP_URL", default="amqp://guest:guest@127.0.0.1:5672/",
              show_default=True, help="admin URL; the bench uses its own vhost fedmask-bench")
@click.option("--redis-url", envvar="FEDMASK_DEMO_REDIS_URL", default="redis://127.0.0.1:6379/1",
              show_default=True, help="a Redis database the bench resets (never db 0)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench-decoupling"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
def decoupling(devices: int, pi4: int, rounds: int, quorum: float, late: str, amqp_url: str, redis_url: str,
               out: Path, as_json: bool) -> None:
    """Median round time of a mixed Pi 4 / Jetson fleet vs an all-Jetson fleet (real pipeline)."""
    from ops.bench.decoupling import run_decoupling_bench
    from ops.bench.report import format_decoupling
    from shared.errors import FedMaskError

    try:
        r = run_decoupling_bench(devices=devices, pi4=pi4, rounds=rounds, quorum=quorum, late=late,
                                 amqp_url=amqp_url, redis_url=redis_url, out=out,
                                 say=lambda m: click.echo(m, err=True))
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out / "decoupling.json", r)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(format_decoupling(r))


@bench.command("byzantine")
@click.option("--task", type=click.Choice(["activity", "mnist"]), default="mnist", show_default=True)
@click.option("--seeds", type=int, default=3, show_default=True, help="seeds 0..N-1 (data split, model, sampling)")
@click.option("--first-seed", type=int, default=0, show_default=True,
              help="start the seeds here (split one measurement over processes; merge their JSON runs)")
@click.option("--rounds", type=int, default=10, show_default=True)
@click.option("--share", type=float, default=0.1, show_default=True, help="share of the fleet that is Byzantine")
@click.option("--methods", default="head,robust", show_default=True,
              help="comma-separated merge rules (task preset config) and/or mask variants (fedmask-local, "
                   "fedmask-agree); the first is the baseline of the clean cost")
@click.option("--attacks", default="zeros,ones,invert", show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def byzantine(task: str, seeds: int, first_seed: int, rounds: int, share: float, methods: str, attacks: str,
              json_out: Path | None) -> None:
    """Honest devices' accuracy shift under Byzantine boards, per method, clean vs attacked (simulator)."""
    from tqdm import tqdm

    from ops.bench.byzantine import ByzantineBenchConfig, format_table, plan, run_bench, summarize

    cfg = ByzantineBenchConfig(task=task, seeds=tuple(range(first_seed, first_seed + seeds)), rounds=rounds,
                               share=share,
                               methods=tuple(m for m in methods.split(",") if m),
                               attacks=tuple(a for a in attacks.split(",") if a))
    bar = tqdm(total=len(plan(cfg)), desc=f"byzantine {task}", unit="run", file=sys.stderr,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)

    rows: list[dict[str, Any]] = []

    def done(run: Any, row: dict[str, Any]) -> None:
        bar.update()
        rows.append(row)  # written as it goes: a run cut short keeps its finished seeds
        write_json(json_out, {"config": {**asdict(cfg), "partial": True}, "runs": rows,
                              "summary": summarize(rows, cfg.methods, cfg.attacks)})
        if not sys.stderr.isatty():  # a log line per run instead of a bar
            click.echo(f"{run.method} {run.condition} seed {run.seed}: honest {row['honest_accuracy']:.4f} "
                       f"({row['wall_seconds']:.0f} s)", err=True)

    try:
        result = run_bench(cfg, on_run=done)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    write_json(json_out, result)
    click.echo(format_table(result))


@bench.command("quorum")
@click.option("--rounds", type=int, default=2000, show_default=True)
@click.option("--devices", type=int, default=10, show_default=True, help="K, the round's target")
@click.option("--quorum", type=float, default=0.8, show_default=True)
@click.option("--settings", default="1:0,1.5:0,1.5:1.5,1.5:3,2:6", show_default=True,
              help="comma-separated over_select:min_wait_seconds pairs")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def quorum(rounds: int, devices: int, quorum: float, settings: str, seed: int, json_out: Path | None) -> None:
    """Quorum fairness (a model, no services): who is inside the quorum, with one fast malicious board."""
    from ops.bench.quorum_fairness import Setting, format_quorum, run_quorum_bench

    try:
        parsed = [Setting(float(a), float(b)) for a, b in (s.split(":") for s in settings.split(",") if s)]
    except ValueError as exc:
        raise click.ClickException(f"--settings: {exc}") from exc
    result = run_quorum_bench(parsed, rounds=rounds, devices=devices, quorum=quorum, seed=seed)
    write_json(json_out, result)
    click.echo(format_quorum(result))


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _strict_json(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict_json(v) for v in x]
    return x


@bench.command("rhythm")
@click.option("--sizes", default="10,100,1000,10000", show_default=True, help="fleet sizes, comma-separated")
@click.option("--slow-shares", default="0.3,0.7", show_default=True)
@click.option("--slowdowns", default="5,20", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--rounds", type=int, default=100, show_default=True, help="sync-all rounds (sets the target)")
@click.option("--modes", default="sync,quorum,async,async-sqrt", show_default=True)
@click.option("--k-fraction", type=float, default=0.1, show_default=True, help="async buffer K as a share of the fleet")
@click.option("--async-staleness", type=int, default=20, show_default=True, help="async bound on tau (merges)")
@click.option("--horizon-factor", type=float, default=2.0, show_default=True,
              help="other modes run to this many times sync-all's time to target")
@click.option("--learner", type=click.Choice(["vector", "torch"]), default="vector", show_default=True,
              help="vector: batched numpy FedMask on digits (any size); torch: DeviceRuntime on digits (<= 100)")
@click.option("--variant", type=click.Choice([v for v in VARIANTS.choices if v != "preset"]), default=None,
              help="--learner torch: that pipeline variant's model, device config and rule (fedmask-agree: the "
                   "agreement rule, theta down as q4) [default: the digits preset, rule paper]")
@click.option("--scale", type=int, default=None,
              help="instead: run each of --modes alone for --rounds merges at this many boards and print the "
                   "simulator's wall and CPU time")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/rhythm"), show_default=True,
              help="directory for rhythm.json and rhythm.png")
def rhythm(sizes: str, slow_shares: str, slowdowns: str, seeds: str, rounds: int, modes: str, k_fraction: float,
           async_staleness: int, horizon_factor: float, learner: str, variant: str | None, scale: int | None,
           as_json: bool, out: Path) -> None:
    """Sync-all vs quorum with carry vs buffered async on a simulated clock (issue 13): accuracy against
    simulated time, time to 95% of sync-all's final accuracy, updates and masks per board by profile."""
    from ops.bench.rhythm import RhythmBench, format_table, plot, run_rhythm_bench, scale_check

    if scale is not None:
        for mode in (m for m in modes.split(",") if m):
            r = scale_check(scale, mode, rounds, k_fraction=k_fraction)
            click.echo(json.dumps(r) if as_json else
                       f"{scale} boards, {mode}: {r['merges']} merges, {r['trained']} trainings, "
                       f"{r['sim_seconds']:.0f} simulated s in {r['wall_seconds']:.0f} s wall "
                       f"({r['cpu_seconds']:.0f} s CPU; setup {r['setup_wall_seconds']:.0f} s wall), "
                       f"final accuracy {r['final_accuracy']:.3f}")
        return

    try:
        b = RhythmBench(sizes=tuple(int(x) for x in _floats(sizes)), slow_shares=_floats(slow_shares),
                        slowdowns=_floats(slowdowns), seeds=tuple(int(x) for x in _floats(seeds)), rounds=rounds,
                        modes=tuple(m for m in modes.split(",") if m), k_fraction=k_fraction,
                        async_staleness=async_staleness, horizon_factor=horizon_factor, learner=learner,
                        variant=variant or "")
    except ValueError as exc:  # --variant without --learner torch
        raise click.ClickException(str(exc)) from exc
    total = len(b.sizes) * len(b.slow_shares) * len(b.slowdowns) * len(b.seeds)
    bar = Progress(total, "fleets", "fleet", stream=sys.stderr)
    say = bar.write if bar.animated else (lambda s: click.echo(s, err=True))
    try:
        done: list[dict[str, Any]] = []

        def on_fleet(r: dict[str, Any]) -> None:  # partial results survive an interrupted run
            done.append(r)
            write_json(out / "rhythm.partial.json", _strict_json(done))
            bar.set_postfix_str(f"{r['devices']} boards")
            bar.update()

        result = run_rhythm_bench(b, say=say, on_fleet=on_fleet)
    finally:
        bar.close()
    result = _strict_json(result)  # never reached = Infinity, which JSON has no word for: null
    write_json(out / "rhythm.json", result)
    plot(result, out / "rhythm.png")
    if as_json:
        click.echo(json.dumps(result["table"], indent=2))
        return
    click.echo(format_table(result["table"]))
    click.echo(f"bench wall time {result['wall_seconds']:.0f} s; figures in {out}/rhythm.json, plot {out}/rhythm.png")
