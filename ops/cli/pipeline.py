"""Pipeline commands: aggregator, worker, devices, round. They only build settings and call."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import click

from ops.cli.common import write_json

AMQP_ENV, REDIS_ENV = "FEDMASK_AMQP_URL", "FEDMASK_REDIS_URL"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/fedmask"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_METRICS_PORT = 9811  # aggregator.metrics.DEFAULT_METRICS_PORT, spelled out so `--help` does not import it
TASKS = click.Choice(["activity", "mnist", "digits", "shakespeare"])
# shared.variant_setup.PIPELINE_VARIANTS, spelled out so that `--help` does not import torch.
VARIANTS = click.Choice(["preset", "fedmask", "fedmask-local", "fedmask-agree", "fedmask-adapt", "fedmask-adapt-local",
                         "fedpm"])
# shared.strategy_setup.PIPELINE_STRATEGIES, spelled out for the same reason, and its NO_PIPELINE, so that
# asking for one of those is refused with the reason (before any connection), not just as an unknown choice.
STRATEGIES = click.Choice(["fedavg", "topk", "feddst", "zerofl", "lg-fedavg", "per-fedavg", "bnn-fedavg",
                           "standalone", "fedmask"])
strategy_opt = click.option("--strategy", type=STRATEGIES, default=None,
                            help="a strategy of shared/strategies/ (docs/design.md, \"Strategies\"; fedmask: FedMask "
                                 "itself behind the strategy interface); aggregator and workers must agree")
variant_opt = click.option("--variant", type=VARIANTS, default="preset", show_default=True,
                           help="preset: FedMask with the task preset and --merge; else a named variant's "
                                "config (tuned if shared/tuned/ has one); aggregator and workers must agree")


def _log(verbose: bool) -> None:
    """JSON lines on stderr. The formatter encodes each record with json.dumps: a message holding what
    a device sent (a routing key with a newline and a JSON object in it) cannot add a line or a field."""
    from shared.log_safety import JsonLogFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("pika").setLevel(logging.WARNING)  # pika's INFO lines drown the service's own


amqp_opt = click.option("--amqp-url", envvar=AMQP_ENV, default=DEFAULT_AMQP, show_default=True)
redis_opt = click.option("--redis-url", envvar=REDIS_ENV, default=DEFAULT_REDIS, show_default=True)

# TLS files for amqps:// and rediss:// URLs. Each flag sets its environment variable for this process
# (and the processes it starts), which is where AmqpSettings.from_url and RoundStore.from_url read them.
TLS_FLAGS = (
    ("--amqp-ca", "FEDMASK_AMQP_CA", "CA bundle the broker's certificate must chain to (amqps://)"),
    ("--amqp-cert", "FEDMASK_AMQP_CERT", "client certificate for the broker (amqps://)"),
    ("--amqp-key", "FEDMASK_AMQP_KEY", "its private key, if not in --amqp-cert"),
    ("--amqp-server-name", "FEDMASK_AMQP_SERVER_NAME", "name checked against the broker's certificate"),
    ("--redis-ca", "FEDMASK_REDIS_CA", "CA bundle Redis's certificate must chain to (rediss://)"),
    ("--redis-cert", "FEDMASK_REDIS_CERT", "client certificate for Redis (rediss://)"),
    ("--redis-key", "FEDMASK_REDIS_KEY", "its private key, if not in --redis-cert"),
)


def _export_env(env: str) -> Any:
    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            os.environ[env] = value

    return callback


def tls_opts(f: Any, *, services: tuple[str, ...] = ("amqp", "redis")) -> Any:
    for flag, env, text in reversed(TLS_FLAGS):
        if flag.split("-")[2] in services:
            f = click.option(flag, envvar=env, default=None, expose_value=False, callback=_export_env(env),
                             help=f"{text} [env {env}]")(f)
    return f


def amqp_tls_opts(f: Any) -> Any:
    return tls_opts(f, services=("amqp",))


def redis_tls_opts(f: Any) -> Any:
    return tls_opts(f, services=("redis",))


def describe_aggregator(cfg: dict[str, str]) -> str:
    """One line on what the running aggregator serves (its fm:config), for `round status` and `devices list`."""
    if not cfg:
        return "aggregator: none has started against this Redis"
    if cfg.get("strategy"):
        return (f"aggregator: {cfg.get('task')} width {cfg.get('width') or 'preset'}, strategy {cfg['strategy']} "
                f"({cfg.get('config_origin')}); workers must run the same --strategy")
    return (f"aggregator: {cfg.get('task')} width {cfg.get('width') or 'preset'}, variant "
            f"{cfg.get('variant') or 'preset'} (merge {cfg.get('merge')}, upload "
            f"{cfg.get('upload') or 'threshold'}); workers must run the same --variant")


@click.group("aggregator")
def aggregator() -> None:
    """The aggregator service."""


@aggregator.command("run")
@amqp_opt
@redis_opt
@tls_opts
@click.option("--task", type=TASKS, default="activity", show_default=True)
@variant_opt
@click.option("--merge", default=None, help="merge rule of --variant preset [default: head]")
@click.option("--width", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--close-lease", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="seconds another aggregator on the same queue waits before finishing a close whose closer died")
@click.option("--closer-id", default="",
              help="this aggregator's name among those sharing the queue [default: host:pid]")
@click.option("--ack-durability", type=click.Choice(["fsync", "unchecked"]), envvar="FEDMASK_ACK_DURABILITY",
              default="fsync", show_default=True,
              help="fsync: refuse a Redis without appendonly yes + appendfsync always (acked updates would die "
                   "with it); unchecked: accept that risk")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="FEDMASK_METRICS_PORT",
              default=DEFAULT_METRICS_PORT, show_default=True, help="Prometheus /metrics port; 0: no endpoint")
@click.option("--metrics-host", envvar="FEDMASK_METRICS_HOST", default="127.0.0.1", show_default=True,
              help="address the metrics endpoint binds (it has no authentication)")
@click.option("--mode", type=click.Choice(["rounds", "async"]), default="rounds", show_default=True,
              help="rounds: the operator opens rounds; async: no rounds, a flush every --buffer stored updates")
@click.option("--buffer", "buffer_k", type=click.IntRange(min=1), default=3, show_default=True,
              help="async: stored updates per flush (K)")
@click.option("--max-staleness", type=click.IntRange(min=0), default=10, show_default=True,
              help="async: other boards' latest updates vote while at most this many versions old")
@click.option("--staleness", type=click.Choice(["constant", "sqrt"]), default="constant", show_default=True,
              help="async: vote weight by staleness tau: 1, or 1/sqrt(1+tau)")
@click.option("--replay-keep", type=click.IntRange(min=0), default=1000, show_default=True,
              help="async: the last N stored updates Redis keeps for a replay (0: none); older ones are "
                   "dropped, so a months-long stream stays bounded")
@strategy_opt
@click.option("--planned-rounds", type=click.IntRange(min=1), default=None,
              help="--strategy: the run's length, over which FedDST anneals its readjustment [default: the preset's]")
def aggregator_run(amqp_url: str, redis_url: str, task: str, variant: str, merge: str | None, width: int | None,
                   seed: int, close_lease: float, closer_id: str, ack_durability: str, metrics_port: int,
                   metrics_host: str, mode: str, buffer_k: int, max_staleness: int, staleness: str,
                   replay_keep: int, strategy: str | None, planned_rounds: int | None) -> None:
    """Consume uplink, persist to Redis, close rounds, publish merged masks (SIGTERM drains). Run several
    against the same queue and Redis to share the load: exactly one closes each round (each serves its
    own metrics endpoint: give each its own --metrics-port)."""
    from aggregator.service import AggregatorService, ServiceSettings
    from shared.errors import ConfigError

    _log(True)
    try:
        svc = AggregatorService(ServiceSettings(amqp_url=amqp_url, redis_url=redis_url, task=task, width=width,
                                                seed=seed, variant=variant, merge=merge, close_lease_s=close_lease,
                                                closer_id=closer_id, ack_durability=ack_durability,
                                                metrics_port=metrics_port, metrics_host=metrics_host,
                                                mode=mode, buffer=buffer_k, max_staleness=max_staleness,
                                                staleness=staleness, replay_keep=replay_keep,
                                                strategy=strategy or "",
                                                planned_rounds=planned_rounds))
    except (ValueError, ConfigError) as exc:  # a variant/merge combination variant_setup refuses
        raise click.ClickException(str(exc)) from exc
    svc.install_signal_handlers()
    try:
        svc.run()
    except ConfigError as exc:  # e.g. a Redis that would lose acked updates (--ack-durability)
        raise click.ClickException(str(exc)) from exc


@click.command("worker")
@click.option("--device-id", required=True)
@click.option("--profile", type=click.Choice(["pi4", "jetson"]), default="jetson", show_default=True)
@click.option("--task", type=TASKS, default="activity", show_default=True)
@variant_opt
@amqp_opt
@amqp_tls_opts
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("runs/worker-state"), show_default=True)
@click.option("--width", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--coding", type=click.Choice(["raw", "delta"]), default="raw", show_default=True,
              help="delta: send each update as its range-coded change against the merged mask the aggregator "
                   "holds, and take merged masks coded the same way (docs/design.md)")
@strategy_opt
def worker(device_id: str, profile: str, task: str, variant: str, amqp_url: str, state_dir: Path,
           width: int | None, seed: int, coding: str, strategy: str | None) -> None:
    """Run one device: prune once, hello, then train on every task and apply every merged mask
    (with --strategy: train that strategy's weights on every task and apply every model sent)."""
    from ops.fleet.board import NoLocalData, board_worker
    from worker.runtime import WrongVariant

    _log(True)
    try:
        w = board_worker(device_id, profile=profile, task=task, amqp_url=amqp_url, state_dir=state_dir, width=width,
                         seed=seed, variant=variant, coding=coding, strategy=strategy)
        w.run()
    except (NoLocalData, WrongVariant, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group("devices")
def devices() -> None:
    """Enrol and list devices."""


@devices.command("enroll")
@click.argument("device_ids", nargs=-1, required=True)
@click.option("--api-url", default="http://127.0.0.1:15672", show_default=True, help="RabbitMQ management API")
@click.option("--admin-user", envvar="FEDMASK_ADMIN_USER", default="guest")
@click.option("--admin-password", envvar="FEDMASK_ADMIN_PASSWORD", default="guest")
@click.option("--vhost", default="fedmask", show_default=True)
@click.option("--amqp-host", default="127.0.0.1", show_default=True,
              help="the broker address as the boards reach it (goes into their URL)")
@click.option("--amqp-port", type=int, default=5672, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write worker settings (JSON, mode 600)")
@redis_opt
def enroll(device_ids: tuple[str, ...], api_url: str, admin_user: str, admin_password: str, vhost: str,
           amqp_host: str, amqp_port: int, out: Path | None, redis_url: str) -> None:
    """Create each device's broker user, queue and permissions; print or write its connection URL.
    An id removed with `devices remove` may say hello again afterwards (Redis at --redis-url)."""
    from aggregator.store import RoundStore, StoreError
    from ops.control.devices import readmit_removed
    from ops.control.enrolment import Management, ManagementError

    mgmt = Management(api_url, admin_user, admin_password)
    try:
        mgmt.ensure_vhost(vhost)
        creds = {d: mgmt.enroll(d, vhost=vhost, amqp_host=amqp_host, amqp_port=amqp_port).amqp_url
                 for d in device_ids}
    except ManagementError as exc:
        raise click.ClickException(str(exc)) from exc
    store = RoundStore.from_url(redis_url)
    try:
        back = readmit_removed(list(device_ids), store)
        if back:
            click.echo(f"readmitted removed devices: {', '.join(back)}", err=True)
    except StoreError as exc:  # the broker side is done; say what is left
        click.echo(f"warning: could not check Redis for removed ids ({exc}); a removed id stays refused "
                   "until this enrolment is repeated with Redis reachable", err=True)
    finally:
        store.close()
    if out:
        write_json(out, creds)
        os.chmod(out, 0o600)
        click.echo(f"enrolled {len(creds)} devices; settings in {out}")
    else:
        for d, url in creds.items():
            click.echo(f"{d}\t{url}")


@devices.command("list")
@redis_opt
@redis_tls_opts
@click.option("--json", "as_json", is_flag=True)
def devices_list(redis_url: str, as_json: bool) -> None:
    """Devices that said hello, with their mask version and last heartbeat."""
    from aggregator.store import RoundStore

    store = RoundStore.from_url(redis_url)
    now = time.time()
    alive = set(store.alive(now - 120))
    rows = [{"device": d, "mask_version": store.mask_version(d), "alive": d in alive} for d in store.device_ids()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(describe_aggregator(store.config()))
    for r in rows:
        click.echo(f"{r['device']:24s} mask v{r['mask_version']:<4} {'alive' if r['alive'] else '-'}")
