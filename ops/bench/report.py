"""Readable output of the benchmarks (`fedmask bench ...` without --json), and the cProfile summary they report."""

from __future__ import annotations

import cProfile
import os
import pstats
from typing import Any


def top_functions(profiler: cProfile.Profile, limit: int = 20) -> list[dict[str, Any]]:
    """The profile's heaviest functions by cumulative time, as rows for a table or JSON."""
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][3], reverse=True)[:limit]
    return [{"function": f"{_short(fn)}:{line}({name})", "calls": nc, "tottime_s": tt, "cumtime_s": ct}
            for (fn, line, name), (_cc, nc, tt, ct, _callers) in rows]


def _short(path: str) -> str:
    """site-packages/redis/client.py -> redis/client.py; /repo/aggregator/core.py -> aggregator/core.py."""
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    return path.removeprefix(os.getcwd() + os.sep)


def describe_host(host: dict[str, float] | None) -> str:
    if not host:
        return "host: n/a"
    return (f"host: {host['cpus']:.0f} CPUs, shared with RabbitMQ and Redis; 1-min load average "
            f"{host['loadavg_1m']:.2f} before, {host['loadavg_1m_after']:.2f} after")

def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def format_aggregate(r: dict[str, Any]) -> str:
    """What `fedmask bench aggregate` prints without --json."""
    return "\n".join([
        f"naive reference : {r['naive_seconds'] * 1e3:9.1f} ms  (np.unpackbits, default int64 sums)",
        f"tuned naive     : {r['tuned_naive_seconds'] * 1e3:9.1f} ms  (np.unpackbits, uint16 sums)",
        f"packed kernel   : {r['kernel_seconds'] * 1e3:9.1f} ms  "
        f"({r['kernel_params_per_second'] / 1e6:,.0f} M params/s, {r['kernel_mb_per_second']:,.0f} MB/s in; numba)",
        f"numpy kernel    : {r['numpy_kernel_seconds'] * 1e3:9.1f} ms  (the fallback without numba; "
        f"{r['numpy_kernel_over_read_pass']:.2f}x the read pass)",
        f"speedup         : {r['speedup']:.1f}x vs the naive reference, "
        f"{r['speedup_vs_tuned_naive']:.1f}x vs the tuned one; output bit-identical: {r['identical']}",
        f"one read pass   : {r['read_pass_seconds'] * 1e3:9.1f} ms  ({r['read_pass_mb_per_second']:,.0f} MB/s over the "
        f"same inputs); kernel / read pass = {r['kernel_over_read_pass']:.2f} (target <= "
        f"{r['kernel_over_read_target']:g}: {_verdict(r['kernel_over_read_pass'] <= r['kernel_over_read_target'])})",
        f"read + write    : {r['read_write_pass_seconds'] * 1e3:9.1f} ms  (read both inputs, write a fresh output "
        f"of the same size: {r['read_write_over_read_pass']:.2f}x the read pass, the floor of any merge)",
    ])


def format_decoupling(r: dict[str, Any]) -> str:
    """What `fedmask bench decoupling` prints without --json."""
    lines = []
    for name in ("mixed", "all_jetson"):
        f = r[name]
        lines.append(f"{name:<11} median round {f['median_round_seconds']:6.2f}s  rounds {f['round_seconds']}  "
                     f"sampled {f['sampled_per_round']}  carried {f['carried']}  late {f['late']}")
    lines.append(f"ratio mixed / all-jetson: {r['median_ratio']:.2f} "
                 f"(target <= 1.3: {'met' if r['met'] else 'NOT met'})")
    return "\n".join(lines)


def _replica_lines(rep: dict[str, Any] | None) -> list[str]:
    if not rep:
        return []
    n = rep["replicas"]
    one, many = rep["one_updates_per_s"], rep[f"{n}_updates_per_s"]
    return [
        "",
        f"aggregator processes on one queue (SIGCONT -> last update stored, {len(one)} alternating pairs):",
        f"  1 replica: {', '.join(f'{x:.0f}' for x in one)} updates/s",
        f"  {n} replicas: {', '.join(f'{x:.0f}' for x in many)} updates/s",
        f"  {n} / 1 = {rep['ratio_median']:.2f} median ({', '.join(f'{x:.2f}' for x in rep['ratios'])}); "
        f"target >= {rep['target_ratio']}: {_verdict(rep['ratio_median'] >= rep['target_ratio'])}; "
        f"load {rep['host']['loadavg_1m']:.2f} before, {rep['host']['loadavg_1m_after']:.2f} after",
    ]


def format_pipeline(r: dict[str, Any]) -> str:
    """What `fedmask bench pipeline` prints without --json."""
    c, ing, raw, close, fl = r["config"], r["ingest"], r["raw"], r["close"], r["adapter_floor"]
    ratios = ", ".join(f"{x:.3f}" for x in r["ingest_over_raw_all"])
    head = [
        f"{c['devices']} devices x {c['params_actual']:,} params ({c['task']} mlp, width {c['width']}), "
        f"updates of {c['update_bytes_mean'] / 1e3:.1f} kB, prefetch {c['prefetch']}",
    ]
    drained = [
        "",
        f"{'one round drained (median pair)':34s} {'updates/s':>10s} {'MB/s':>8s} {'seconds':>8s}",
        f"{'aggregator ingest (to last stored)':34s} {ing['updates_per_s']:10.1f} {ing['mb_per_s']:8.1f} "
        f"{ing['seconds']:8.3f}",
        f"{'  same drain incl. the close':34s} {'':10s} {'':8s} {ing['seconds_incl_close']:8.3f}",
        f"{'raw broker delivery (plain pika)':34s} {raw['updates_per_s']:10.1f} {raw['mb_per_s']:8.1f} "
        f"{raw['seconds']:8.3f}",
        f"ingest / raw = {r['ingest_over_raw']:.3f}, median of {len(r['ingest_over_raw_all'])} pairs ({ratios}); "
        f"target >= {r['ingest_target_ratio']}: {_verdict(r['ingest_over_raw'] >= r['ingest_target_ratio'])}",
        f"aggregator handler: median {ing['handler_ms_median']:.2f} ms per update, "
        f"{ing.get('batch_size_mean', 1):.1f} updates per batch",
        f"adapter floor: shared.amqp.BatchConsumer acking at once {fl['adapter_noop']['updates_per_s']:.1f}/s vs "
        f"raw {fl['raw']['updates_per_s']:.1f}/s over {fl['raw']['updates']} messages = "
        f"{fl['adapter_over_raw']:.3f}",
        "  (the ceiling of ingest / raw: the aggregator's consumer class doing no work at all; one delivery per "
        f"call, shared.amqp.Consumer: {fl.get('single_over_raw', float('nan')):.3f})",
    ] if ing else ["", "(no full-queue drain: --repeats 0)"]
    lines = [
        *head,
        *drained,
        "",
        f"round close latency over {close['rounds']} rounds (closer elected -> last merged mask confirmed):",
        f"  p50 {close['p50_s']:.3f} s   p99 {close['p99_s']:.3f} s   max {close['max_s']:.3f} s   "
        f"(target p99 <= {close['target_s']} s: {_verdict(close['p99_s'] <= close['target_s'])})",
        f"device queues: {r['device_queues']}",
        *_replica_lines(r.get("replica_ingest")),
        describe_host(r.get("host")),
    ]
    for phase, rows in (r.get("profile") or {}).items():
        lines += ["", f"cProfile, {phase.replace('_top', '')} (aggregator handler thread; top by cumulative time):",
                  f"  {'cumtime s':>9s} {'own s':>8s} {'calls':>7s}  function"]
        lines += [f"  {row['cumtime_s']:9.3f} {row['tottime_s']:8.3f} {row['calls']:7d}  {row['function']}"
                  for row in rows]
    lines += [f"PROBLEM: {p}" for p in r["problems"]]
    return "\n".join(lines)


def format_durability(r: dict[str, Any]) -> str:
    """What `fedmask bench pipeline --durability ...` prints without --json: each run, then the cost."""
    lines: list[str] = []
    for policy, run in r["durability"].items():
        lines += [f"== Redis appendfsync {policy} (a redis-server of the benchmark's own, AOF on)",
                  format_pipeline(run), ""]
    lines.append(f"{'appendfsync':12s} {'ingest updates/s':>17s} {'MB/s':>7s} {'handler ms':>11s} {'close p50 s':>12s}")
    for policy, run in r["durability"].items():
        ing = run["ingest"]
        lines.append(f"{policy:12s} {ing['updates_per_s']:17.1f} {ing['mb_per_s']:7.1f} "
                     f"{ing['handler_ms_median']:11.2f} {run['close']['p50_s']:12.3f}")
    if cost := r.get("fsync_cost"):
        lines.append(f"fsync on every ack: ingest x{cost['ingest_always_over_everysec']:.3f} of everysec's, "
                     f"close p50 {cost['close_p50_always_minus_everysec_s'] * 1e3:+.1f} ms")
    return "\n".join(lines)


def format_load(r: dict[str, Any]) -> str:
    """What `fedmask bench load` prints without --json."""
    c, a, t, close = r["config"], r["accounting"], r["throughput"], r["close"]
    peak = r["aggregator_peak_rss_mb"]
    lines = [
        f"{c['devices']} devices x {c['params_actual']:,} params, {r['rounds_completed']}/{c['rounds']} rounds, "
        f"sample rate {c['sample_rate']}, quorum {c['quorum']}, deadline {c['deadline']:g} s",
        f"updates: {t['updates']} in {t['seconds']:.2f} s = {t['updates_per_s']:.1f} updates/s "
        "(first publish -> last message handled, per round)",
        f"round close: p50 {close['p50_s']:.3f} s  p99 {close['p99_s']:.3f} s  max {close['max_s']:.3f} s  "
        f"({close['by_deadline']} closed by deadline)",
        f"aggregator peak RSS: {'n/a' if peak is None else f'{peak:.1f} MB'} ({r['memory_method']})",
        "",
        f"accounting: sent {a['sent']} = merged {a['merged']} + rejected {a['rejected']} + duplicates acked "
        f"{a['duplicates_acked']}  (vanished: {a['vanished']})",
        f"  injected:      {a['injected']}",
        f"  rejected:      {a['rejected_by_reason']}  (late, round_closed: {a['late']})",
        f"  dead letters:  {a['dead_letters_by_reason']}",
        f"device queues: {r['device_queues']}",
        *_replica_lines(r.get("replica_ingest")),
        describe_host(r.get("host")),
    ]
    lines += [f"PROBLEM: {p}" for p in r["problems"]]
    lines.append("accounting OK" if not r["problems"] else f"{len(r['problems'])} problem(s)")
    return "\n".join(lines)
