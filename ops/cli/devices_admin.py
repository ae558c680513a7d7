"""`fedmask devices remove` and `fedmask devices rotate`: a board's end of life and its credentials."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ops.cli.common import write_json
from ops.cli.pipeline import devices, redis_opt

api_opt = click.option("--api-url", default="http://127.0.0.1:15672", show_default=True, help="RabbitMQ management API")
admin_user_opt = click.option("--admin-user", envvar="FEDMASK_ADMIN_USER", default="guest")
admin_password_opt = click.option("--admin-password", envvar="FEDMASK_ADMIN_PASSWORD", default="guest")
vhost_opt = click.option("--vhost", default="fedmask", show_default=True)


@devices.command("remove")
@click.argument("device_ids", nargs=-1, required=True)
@api_opt
@admin_user_opt
@admin_password_opt
@vhost_opt
@redis_opt
@click.option("--json", "as_json", is_flag=True)
def remove(device_ids: tuple[str, ...], api_url: str, admin_user: str, admin_password: str, vhost: str,
           redis_url: str, as_json: bool) -> None:
    """Remove boards for good: revoke their broker user (open connections closed), delete their queue,
    never sample them again; their parked and open-round updates are dropped and counted. `devices
    enroll` brings an id back."""
    from aggregator.store import RoundStore, StoreError
    from ops.control.devices import remove_device
    from ops.control.enrolment import Management, ManagementError

    mgmt, store = Management(api_url, admin_user, admin_password), RoundStore.from_url(redis_url)
    rows = []
    try:
        for d in device_ids:
            r = remove_device(d, mgmt=mgmt, store=store, vhost=vhost)
            rows.append({"device": d, "was_enrolled": r.was_enrolled, "parked_dropped": r.parked_dropped,
                         "stored_dropped": r.stored_dropped, "notes": r.notes})
    except (ManagementError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        extra = "; ".join(row["notes"])  # type: ignore[arg-type]
        click.echo(f"removed {row['device']}: parked update dropped {row['parked_dropped']}, open-round update "
                   f"dropped {row['stored_dropped']}{'; ' + extra if extra else ''}")


@devices.command("rotate")
@click.argument("device_ids", nargs=-1, required=True)
@api_opt
@admin_user_opt
@admin_password_opt
@vhost_opt
@click.option("--amqp-host", default="127.0.0.1", show_default=True,
              help="the broker address as the boards reach it (goes into their URL)")
@click.option("--amqp-port", type=int, default=5672, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the new settings (JSON, mode 600)")
def rotate(device_ids: tuple[str, ...], api_url: str, admin_user: str, admin_password: str, vhost: str,
           amqp_host: str, amqp_port: int, out: Path | None) -> None:
    """New passwords for enrolled boards. The old ones are refused at once and the boards' connections
    closed: give each board its new URL (worker --amqp-url or FEDMASK_AMQP_URL)."""
    from ops.control.devices import rotate_device
    from ops.control.enrolment import Management, ManagementError

    mgmt = Management(api_url, admin_user, admin_password)
    try:
        creds = {d: rotate_device(d, mgmt=mgmt, vhost=vhost, amqp_host=amqp_host, amqp_port=amqp_port).amqp_url
                 for d in device_ids}
    except ManagementError as exc:
        raise click.ClickException(str(exc)) from exc
    if out:
        write_json(out, creds)
        os.chmod(out, 0o600)
        click.echo(f"rotated {len(creds)} devices; new settings in {out}")
    else:
        for d, url in creds.items():
            click.echo(f"{d}\t{url}")
