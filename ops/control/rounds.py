"""Drive rounds back to back against a running aggregator service, and describe a round for humans.

The operator side never merges or closes anything itself: it opens a round (AggregatorCore.start_round,
which samples and sends tasks), then watches Redis until the aggregator service closes it. Used by
`fedmask round start|run|watch|status`, `make status`, the pipeline demo and the benchmarks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aggregator.core import AggregatorCore
from aggregator.round_stats import mean_stats
from aggregator.store import RoundInfo, RoundStore
from shared.amqp import AmqpSettings, Publisher
from shared.errors import FedMaskError
from shared.variant_setup import PRESET_VARIANT, variant_setup

log = logging.getLogger("fedmask.rounds")
DEFAULT_OPERATOR_AMQP = "amqp://guest:guest@127.0.0.1:5672/fedmask"

# The aggregator's deadline ticker runs every 0.5 s; past this grace a round still open after its
# deadline means no aggregator is consuming (or it is wedged): say so instead of waiting forever.
STALL_GRACE_S = 15.0


@dataclass(frozen=True)
class RoundPlan:
    """How every round of a run is opened (the flags of `fedmask round start`)."""

    rate: float | None = 1.0
    devices: int | None = None
    quorum: float = 1.0
    deadline_s: float = 600.0
    over_select: float = 1.0
    seed: int = 0
    late: str = "drop"
    max_staleness: int = 2
    min_wait: float = 0.0

    def start_kwargs(self) -> dict[str, Any]:
        return {"rate": self.rate, "devices": self.devices, "quorum": self.quorum, "deadline_s": self.deadline_s,
                "over_select": self.over_select, "seed": self.seed, "late": self.late,
                "max_staleness": self.max_staleness, "min_wait": self.min_wait}


@dataclass
class RunLog:
    rounds: list[RoundInfo] = field(default_factory=list)

    def durations(self) -> list[float]:
        return [r.closed_at - r.opened_at for r in self.rounds if r.closed_at is not None]


class AggregatorMismatch(FedMaskError):
    """No aggregator has recorded its model in this Redis, or it serves another task or width."""


def operator_amqp_url(amqp_url: str | None, cfg: dict[str, str], *, warn: Callable[[str], None]) -> str:
    """The broker the operator sends tasks through: the one the running aggregator serves (its record
    in Redis holds the address, never credentials), as the default operator user guest; an explicit
    URL wins, with a warning when it points elsewhere (tasks would reach another deployment's queues)."""
    recorded = cfg.get("amqp_address")
    if amqp_url is None:
        if not recorded:
            return DEFAULT_OPERATOR_AMQP
        parts = urlsplit(recorded)
        return urlunsplit(parts._replace(netloc=f"guest:guest@{parts.netloc}"))
    if recorded and AmqpSettings.from_url(amqp_url).address() != recorded:
        warn(f"--amqp-url names {AmqpSettings.from_url(amqp_url).address()}, but the aggregator using this Redis "
             f"serves {recorded}: its boards will not get these tasks")
    return amqp_url


def core_for_running_aggregator(amqp_url: str | None, redis_url: str, task: str | None, width: int | None,
                                seed: int, *, warn: Callable[[str], None] = log.warning) -> AggregatorCore:
    """An AggregatorCore for opening rounds. Task, width and seed default to those the running
    aggregator recorded in Redis, and the variant is always its own (a personal head changes the
    model), so tasks name the model the aggregator validates against; the broker too
    (operator_amqp_url)."""
    store = RoundStore.from_url(redis_url)
    cfg = store.config()
    amqp_url = operator_amqp_url(amqp_url, cfg, warn=warn)
    if not cfg and task is None:
        raise AggregatorMismatch("no aggregator has started against this Redis yet: run `make up` "
                                 "(or `fedmask aggregator run`), or pass --task")
    task = task or cfg["task"]
    if width is None and cfg.get("width") and task == cfg.get("task"):
        width = int(cfg["width"])
    model_seed = int(cfg.get("seed", seed))  # --seed is the sampling seed; the model's is the aggregator's
    if cfg.get("strategy"):
        return _strategy_core(store, amqp_url, cfg, task, width, model_seed)
    variant = cfg.get("variant") or PRESET_VARIANT  # an aggregator from before variants: the preset
    merge = (cfg.get("merge") or None) if variant == PRESET_VARIANT else None  # a named variant brings its own
    try:
        setup = variant_setup(task, variant, width=width, seed=model_seed, merge=merge)
    except ValueError as exc:  # e.g. a tuning file for this task that does not load
        raise AggregatorMismatch(f"cannot build the aggregator's variant {variant} for {task}: {exc}") from exc
    core = AggregatorCore(store, Publisher(AmqpSettings.from_url(amqp_url), declare=True), setup.spec,
                          merge=setup.merge, prune_last_k=setup.fedmask.prune_last_k,
                          prune_rho=setup.fedmask.prune_rho)
    if cfg and core.fingerprint != cfg.get("fingerprint"):
        raise AggregatorMismatch(
            f"the running aggregator serves {cfg.get('task')} (width {cfg.get('width') or 'preset'}, variant "
            f"{variant}), not {task} (width {width or 'preset'}): drop --task/--width to use the aggregator's")
    return core


def _strategy_core(store: RoundStore, amqp_url: str, cfg: dict[str, str], task: str, width: int | None,
                   model_seed: int) -> AggregatorCore:
    """The operator's side of `--strategy` rounds: the same setup the aggregator built, checked by its
    fingerprint (StrategyRoundsCore opens rounds and sends the tasks)."""
    from aggregator.core_strategy_rounds import StrategyRoundsCore
    from shared.strategy_setup import strategy_setup

    planned = int(cfg["planned_rounds"]) if cfg.get("planned_rounds") else None
    try:
        setup = strategy_setup(task, cfg["strategy"], width=width, seed=model_seed, rounds=planned)
    except ValueError as exc:
        raise AggregatorMismatch(f"cannot build the aggregator's strategy {cfg['strategy']} for {task}: {exc}") from exc
    if setup.fingerprint != cfg.get("fingerprint"):
        served = f"{cfg.get('task')} (width {cfg.get('width') or 'preset'}, strategy {cfg['strategy']})"
        raise AggregatorMismatch(f"the running aggregator serves {served}, not {task} (width {width or 'preset'}): "
                                 "drop --task/--width to use the aggregator's")
    return StrategyRoundsCore(store, Publisher(AmqpSettings.from_url(amqp_url), declare=True), setup, seed=model_seed)


def wait_closed(store: RoundStore, round_id: int, *, poll_s: float = 0.1, timeout_s: float | None = None,
                on_poll: Callable[[RoundInfo], None] | None = None) -> RoundInfo:
    """Block until the aggregator service has closed `round_id`; FedMaskError if it never will (open
    past its deadline plus a grace) or if `timeout_s` passes first."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = store.info(round_id)
        if info is None:
            raise FedMaskError(f"round {round_id} vanished from Redis (was the store flushed?)")
        if on_poll is not None:
            on_poll(info)
        if info.state == "closed":
            return info
        if info.state == "open" and time.time() > info.deadline + STALL_GRACE_S:
            raise FedMaskError(f"round {round_id} is still open {STALL_GRACE_S:.0f}s after its deadline: "
                               "is the aggregator running? (`make status`, `fedmask aggregator run`)")
        if end is not None and time.monotonic() > end:
            raise FedMaskError(f"timed out after {timeout_s:g} s waiting for round {round_id} to close")
        time.sleep(poll_s)


def run_rounds(core: AggregatorCore, store: RoundStore, rounds: int, plan: RoundPlan, *,
               on_round: Callable[[RoundInfo], None] | None = None,
               on_poll: Callable[[RoundInfo], None] | None = None, budget_s: float | None = None) -> RunLog:
    """Open `rounds` rounds one after another, each as soon as the previous one closed; with `budget_s`,
    no round opens once that many seconds have passed (the one running then is let close)."""
    if rounds < 1:
        raise FedMaskError(f"rounds must be >= 1, got {rounds}")
    current = store.current_round()
    if current is not None:
        info = store.info(current)
        if info is not None and info.state != "closed":  # finish what is running instead of failing
            wait_closed(store, current, on_poll=on_poll)
    log = RunLog()
    start = time.monotonic()
    for _ in range(rounds):
        if budget_s is not None and time.monotonic() - start >= budget_s:
            break
        opened = core.start_round(**plan.start_kwargs())
        info = wait_closed(store, opened.round_id, on_poll=on_poll)
        log.rounds.append(info)
        if on_round is not None:
            on_round(info)
    return log


DeviceStats = dict[str, dict[str, float]]  # device -> what its update reported (aggregator/round_stats.py)


def _fmt(x: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}{spec}}"


def round_rows(info: RoundInfo, now: float, stats: DeviceStats | None = None) -> list[dict[str, Any]]:
    """One row per device involved in the round: its state, how long its update took, and the training
    loss and accuracy and validation accuracy it reported (None: not reported, or not stored yet)."""
    received, carried, late = set(info.received), set(info.carried), set(info.late)
    stats = stats or {}
    rows = []
    for d in sorted(set(info.sampled) | carried):
        if d in received:
            state = "received"
        elif d in carried:
            state = "carried"
        elif d in late:
            state = "late"
        else:
            state = "waiting" if info.state == "open" else "missed"
        latency = info.arrivals.get(d)
        if latency is None and state == "waiting":
            latency = now - info.opened_at  # still running: how long it has been
        mine = stats.get(d, {})
        rows.append({"device": d, "state": state, "seconds": None if latency is None else round(latency, 3),
                     "loss": mine.get("loss"), "accuracy": mine.get("accuracy"),
                     "val_accuracy": mine.get("val_accuracy")})
    return rows


def round_summary(info: RoundInfo, now: float, stats: DeviceStats | None = None) -> dict[str, Any]:
    end = info.closed_at if info.closed_at is not None else now
    return {"round": info.round_id, "state": info.state, "sampled": len(info.sampled),
            "received": len(info.received), "carried": len(info.carried), "late": len(info.late),
            "quorum": info.quorum, "elapsed_s": round(end - info.opened_at, 3),
            "seconds_to_deadline": round(max(0.0, info.deadline - now), 1),
            "close_latency_s": None if info.close_seconds is None else round(info.close_seconds, 4),
            "policy": info.policy, **mean_stats(stats or {})}


def render_round(info: RoundInfo, now: float, stats: DeviceStats | None = None) -> str:
    """The text of `fedmask round watch` and `round status`: a header line, the round's means and a
    device table."""
    s = round_summary(info, now, stats)
    head = (f"round {s['round']}  {s['state']:<7}  received {s['received']}/{s['sampled']} (quorum {s['quorum']})"
            f"  carried {s['carried']}  late {s['late']}  {s['elapsed_s']:.1f}s elapsed")
    if s["state"] == "open":
        head += f", {s['seconds_to_deadline']:.0f}s to deadline"
    if s["close_latency_s"] is not None:
        head += f", closed in {s['close_latency_s'] * 1e3:.0f} ms"
    means = (f"mean over reporting devices: train loss {_fmt(s['mean_train_loss'], '.4f', 0)}, "
             f"train acc {_fmt(s['mean_train_accuracy'], '.3f', 0)}, val acc {_fmt(s['mean_val_accuracy'], '.3f', 0)}")
    lines = [head, means, f"{'device':<24} {'state':<9} {'seconds':>8} {'loss':>8} {'acc':>6} {'val acc':>7}"]
    for row in round_rows(info, now, stats):
        lines.append(f"{row['device']:<24} {row['state']:<9} {_fmt(row['seconds'], '.2f', 8)} "
                     f"{_fmt(row['loss'], '.4f', 8)} {_fmt(row['accuracy'], '.3f', 6)} "
                     f"{_fmt(row['val_accuracy'], '.3f', 7)}")
    return "\n".join(lines)


def render_history(rows: list[dict[str, Any]]) -> str:
    """The text of `fedmask round history`: one line per round (aggregator/round_stats.history rows)."""
    lines = [f"{'round':>6} {'state':<8}{'sampled':>8}{'recv':>6}{'merged':>7}{'late':>6}{'carried':>8}"
             f"{'loss':>9}{'acc':>7}{'val acc':>8}{'round s':>9}{'close ms':>9}"]
    for r in rows:
        close_ms = None if r["close_latency_s"] is None else r["close_latency_s"] * 1e3
        merged = "-" if r["merged"] is None else str(r["merged"])
        lines.append(f"{r['round']:>6} {r['state']:<8}{r['sampled']:>8}{r['received']:>6}{merged:>7}{r['late']:>6}"
                     f"{r['carried']:>8} {_fmt(r['mean_train_loss'], '.4f', 8)}"
                     f" {_fmt(r['mean_train_accuracy'], '.3f', 6)} {_fmt(r['mean_val_accuracy'], '.3f', 7)}"
                     f" {_fmt(r['duration_s'], '.1f', 8)}"
                     f" {_fmt(close_ms, '.0f', 8)}")
    return "\n".join(lines)
