"""`fedmask`: one console entry point. Commands only parse flags, build settings and call the rest of ops/
(or shared/, aggregator/, worker/)."""

from __future__ import annotations

import click

from ops.cli.bench import bench
from ops.cli.bench_capacity import capacity as _capacity  # noqa: F401  (registers bench capacity)
from ops.cli.demo import demo
from ops.cli.devices_admin import remove as _remove  # noqa: F401  (registers devices remove/rotate)
from ops.cli.experiment import experiment
from ops.cli.export import export
from ops.cli.pipeline import aggregator, devices, worker
from ops.cli.rounds import round_
from ops.cli.services import services
from ops.cli.simulate import simulate
from ops.cli.tune import tune_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fedmask")
def main() -> None:
    """Personalized federated learning with binary masks (FedMask) for edge boards."""


main.add_command(simulate)
main.add_command(experiment)
main.add_command(bench)
main.add_command(export)
main.add_command(aggregator)
main.add_command(worker)
main.add_command(devices)
main.add_command(round_)
main.add_command(services)
main.add_command(demo)
main.add_command(tune_cmd)
