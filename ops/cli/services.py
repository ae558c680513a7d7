"""`fedmask services up | down | status` (what `make up | down | status` run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ops.cli.pipeline import TASKS, amqp_opt, redis_opt, tls_opts
from shared.errors import FedMaskError


def _deployment(kw: dict[str, Any]) -> Any:
    from ops.services.deployment import Deployment

    return Deployment(amqp_url=kw["amqp_url"], redis_url=kw["redis_url"], run_dir=kw["run_dir"],
                      task=kw.get("task") or "activity", width=kw.get("width"), merge=kw.get("merge") or "head")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _default_run_dir() -> Path:
    from ops.services.deployment import default_run_dir

    return default_run_dir()


run_dir_opt = click.option("--run-dir", envvar="FEDMASK_RUN_DIR", type=click.Path(path_type=Path),
                           default=_default_run_dir, show_default="~/.local/state/fedmask/services",
                           help="pid, log and local Redis data (the same from any folder)")


@click.group("services")
def services() -> None:
    """Bring the broker, Redis and the aggregator up or down on this machine."""


@services.command("up")
@amqp_opt
@redis_opt
@tls_opts
@run_dir_opt
@click.option("--task", envvar="FEDMASK_TASK", type=TASKS, default="activity", show_default=True)
@click.option("--width", envvar="FEDMASK_WIDTH", type=int, default=None)
@click.option("--merge", envvar="FEDMASK_MERGE", default="head", show_default=True)
def up(**kw: Any) -> None:
    """Docker compose if a Docker engine answers; else local services and a background aggregator."""
    from ops.services.lifecycle import up as _up

    try:
        mode = _up(_deployment(kw), _say)
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    _say(f"up ({mode}). Next: `fedmask devices enroll ID`, `fedmask worker ...`, `fedmask round run --rounds R`")


@services.command("down")
@amqp_opt
@redis_opt
@run_dir_opt
def down(**kw: Any) -> None:
    """Drain and stop the aggregator; stop the broker and Redis only if `up` started them."""
    from ops.services.lifecycle import down as _down

    _down(_deployment(kw), _say)


@services.command("status")
@amqp_opt
@redis_opt
@run_dir_opt
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool, **kw: Any) -> None:
    """What is up, the aggregator's model, enrolled devices and the newest round. Exit 1 if anything is down."""
    from ops.services.lifecycle import healthy, render_status
    from ops.services.lifecycle import status as _status

    st = _status(_deployment(kw))
    click.echo(json.dumps(st, indent=2) if as_json else render_status(st))
    raise SystemExit(0 if healthy(st) else 1)
