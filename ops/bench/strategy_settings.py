"""One variant's tuned config with settings changed, over seeds, as a spread report (the same files
as `fedmask experiment --variants`): e.g. ZeroFL's three unsent-entry rules side by side.

    python -m ops.bench.strategy_settings --task mnist --variant zerofl --seeds 3 --rounds 20 \
        --setting zero:unsent=zero --setting holders:unsent=holders --out runs/zerofl-rules

A setting is NAME:KNOB=VALUE[,KNOB=VALUE...] (NAME: alone runs the config unchanged); values are
parsed as JSON when they can be (numbers, true/false), else kept as strings. The tuned config comes
from shared/tuned/ as `experiment` reads it, or from --tuning-file (a `fedmask tune --out` record).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ops.cli.common import build_run
from ops.engine.variants import run_variants, tuned_configs
from shared.sim.tuning import data_split
from shared.sim.variants import VariantConfig, default_config


class _NoBar:
    def __call__(self, done: int, total: int, info: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    changes: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        knob, _, raw = item.partition("=")
        try:
            changes[knob] = json.loads(raw)
        except json.JSONDecodeError:
            changes[knob] = raw
    if not name:
        raise ValueError(f"setting {text!r} has no name")
    return name, changes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--partition", default="shards")
    ap.add_argument("--setting", action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tuning-file", type=Path, default=None,
                    help="a `fedmask tune --out` record to take the config from instead of shared/tuned/")
    args = ap.parse_args(argv)
    setups = {s: build_run(args.task, None, None, s, partition=args.partition) for s in range(args.seeds)}
    p = setups[0].preset
    key = data_split(args.task, p, args.partition)["key"]
    if args.tuning_file is not None:
        raw = json.loads(args.tuning_file.read_text())
        if raw.get("variant") != args.variant or raw.get("task") != args.task:
            raise SystemExit(f"{args.tuning_file} is for {raw.get('task')}/{raw.get('variant')}")
        base = VariantConfig.from_json(raw["chosen"]["config"], default_config(args.variant, p))
        origin = str(args.tuning_file)
    else:
        base, origin = tuned_configs(args.task, [args.variant], key, say=print)[args.variant]
    configs: dict[str, tuple[VariantConfig, str]] = {}
    for text in args.setting:
        name, changes = parse_setting(text)
        configs[name] = (base.with_(**changes), f"{origin} with {changes}")
    rounds = args.rounds or p.rounds
    print(run_variants(args.task, configs, {s: (r.data, r.spec) for s, r in setups.items()}, p, partition_key=key,
                       rounds=rounds, eval_every=max(1, rounds // 10), out=args.out, progress=lambda _: _NoBar(),
                       say=print))


if __name__ == "__main__":
    main()
