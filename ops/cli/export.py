"""`fedmask export`: a device's mask + frozen weights -> a physically smaller dense model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ops.cli.common import write_json


@click.command()
@click.argument("state", type=click.Path(exists=True, path_type=Path))
@click.option("--device", "device_id", default=None, help="with a directory: which device (default: the first)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the compact model (.npz)")
@click.option("--repeats", type=int, default=200, show_default=True, help="latency samples per model")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def export(state: Path, device_id: str | None, out: Path | None, repeats: int, json_out: Path | None,
           as_json: bool) -> None:
    """Export the compact model of the device state STATE (a .npz, or a directory from --save-devices)."""
    from ops.engine.export import NoDeviceState, export_device, pick_state, render_export

    try:
        path = pick_state(state, device_id)
    except NoDeviceState as exc:
        raise click.ClickException(str(exc)) from exc
    report = export_device(path, repeats=repeats, out=out)
    write_json(json_out, report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_export(report))
