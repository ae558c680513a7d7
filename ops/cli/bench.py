"""`fedmask bench`: benchmarks kept out of the test suite."""

from __future__ import annotations

import json

import click

from shared.bench_aggregate import run_aggregate_bench


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
    click.echo(f"naive reference : {r['naive_seconds'] * 1e3:9.1f} ms  (np.unpackbits, default int64 sums)")
    click.echo(f"tuned naive     : {r['tuned_naive_seconds'] * 1e3:9.1f} ms  (np.unpackbits, uint16 sums)")
    click.echo(f"packed kernel   : {r['kernel_seconds'] * 1e3:9.1f} ms  "
               f"({r['kernel_params_per_second'] / 1e6:,.0f} M params/s, {r['kernel_mb_per_second']:,.0f} MB/s in)")
    click.echo(f"speedup         : {r['speedup']:.1f}x vs the naive reference, "
               f"{r['speedup_vs_tuned_naive']:.1f}x vs the tuned one; output bit-identical: {r['identical']}")
