"""`fedmask round start | status | watch | run`: the operator's side of a round."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ops.cli.pipeline import AMQP_ENV, TASKS, describe_aggregator, redis_opt, redis_tls_opts, tls_opts
from ops.cli.progress import Progress
from shared.errors import FedMaskError


@click.group("round")
def round_() -> None:
    """Start, watch and drive rounds (the aggregator service closes them)."""


operator_amqp_opt = click.option(
    "--amqp-url", envvar=AMQP_ENV, default=None,
    help="broker to send tasks through [default: the running aggregator's, recorded in Redis, as guest]")


def _core(amqp_url: str | None, redis_url: str, task: str | None, width: int | None, seed: int) -> Any:
    from ops.control.rounds import AggregatorMismatch, core_for_running_aggregator

    try:
        return core_for_running_aggregator(amqp_url, redis_url, task, width, seed,
                                           warn=lambda m: click.echo(f"warning: {m}", err=True))
    except AggregatorMismatch as exc:
        raise click.ClickException(str(exc)) from exc


def plan_options(f: Any) -> Any:
    """The sampling and policy flags shared by `round start` and `round run`."""
    for opt in reversed([
        click.option("--sample-rate", type=float, default=None, help="fraction of idle devices [default: all]"),
        click.option("--devices", "count", type=int, default=None, help="sample exactly K devices"),
        click.option("--quorum", type=float, default=1.0, show_default=True,
                     help="fraction of the K target updates that closes the round"),
        click.option("--deadline", type=float, default=600.0, show_default=True, help="seconds"),
        click.option("--over-select", type=float, default=1.0, show_default=True,
                     help="task ceil(K x F) devices; the quorum stays a fraction of K"),
        click.option("--min-wait", type=float, default=0.0, show_default=True,
                     help="seconds: the quorum closes a round no earlier, so every board answering "
                          "within it is merged (fast boards alone cannot fill the quorum)"),
        click.option("--late", type=click.Choice(["drop", "carry"]), default="drop", show_default=True,
                     help="late updates: reject (counted), or merge into a later round"),
        click.option("--max-staleness", type=int, default=2, show_default=True,
                     help="rounds a late update may be carried, and a busy device is skipped"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--task", type=TASKS, default=None, help="default: the running aggregator's"),
        click.option("--width", type=int, default=None, help="default: the running aggregator's"),
        operator_amqp_opt, redis_opt, tls_opts,
    ]):
        f = opt(f)
    return f


def _plan(kw: dict[str, Any]) -> Any:
    from ops.control.rounds import RoundPlan

    rate = kw["sample_rate"] if kw["sample_rate"] is not None or kw["count"] is not None else 1.0
    return RoundPlan(rate=rate, devices=kw["count"], quorum=kw["quorum"], deadline_s=kw["deadline"],
                     over_select=kw["over_select"], seed=kw["seed"], late=kw["late"],
                     max_staleness=kw["max_staleness"], min_wait=kw["min_wait"])


@round_.command("start")
@plan_options
@click.option("--json", "as_json", is_flag=True)
def round_start(as_json: bool, **kw: Any) -> None:
    """Sample idle devices, open the next round and send their tasks (not needed in async mode)."""
    _refuse_async(kw["redis_url"])
    core = _core(kw["amqp_url"], kw["redis_url"], kw["task"], kw["width"], kw["seed"])
    try:
        info = core.start_round(**_plan(kw).start_kwargs())
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    payload = {"round": info.round_id, "sampled": info.sampled, "quorum": info.quorum, "deadline": info.deadline,
               "carried": info.carried}
    click.echo(json.dumps(payload) if as_json else f"round {info.round_id}: {len(info.sampled)} sampled, "
               f"quorum {info.quorum}, {len(info.carried)} late updates carried in, deadline in {kw['deadline']:.0f}s")


def _refuse_async(redis_url: str) -> None:
    from aggregator.store import RoundStore
    from ops.control.async_status import ASYNC_NO_ROUNDS, is_async

    if is_async(RoundStore.from_url(redis_url)):
        raise click.ClickException(ASYNC_NO_ROUNDS)


def _async_text(store: Any, as_json: bool = False) -> str | None:
    """The async stream's status, or None when the aggregator runs rounds."""
    from ops.control.async_status import async_summary, is_async, render_async

    if not is_async(store):
        return None
    s = async_summary(store)
    return json.dumps({**s, "counters": store.counters(), "aggregator": store.config()}, indent=2) if as_json \
        else render_async(s)


def _info(redis_url: str, round_id: int | None, store: Any = None) -> Any:
    from aggregator.store import RoundStore

    store = store or RoundStore.from_url(redis_url)
    r = round_id if round_id is not None else store.current_round()
    info = store.info(r) if r is not None else None
    if info is None:
        raise click.ClickException("no such round" if round_id is not None else "no round has been started")
    return store, info


@round_.command("status")
@click.argument("round_id", type=int, required=False)
@redis_opt
@redis_tls_opts
@click.option("--json", "as_json", is_flag=True)
def round_status(round_id: int | None, redis_url: str, as_json: bool) -> None:
    """State of ROUND (default: the newest), with per-device latency, training loss and accuracy and
    validation accuracy, and their means."""
    from aggregator.round_stats import round_stats
    from aggregator.store import RoundStore
    from ops.control.rounds import render_round, round_rows, round_summary

    text = _async_text(RoundStore.from_url(redis_url), as_json)
    if text is not None:
        click.echo(text)
        return
    store, info = _info(redis_url, round_id)
    now = time.time()
    stats = round_stats(store, info.round_id)
    if as_json:
        payload = {**round_summary(info, now, stats), "devices": round_rows(info, now, stats),
                   "counters": store.counters(), "aggregator": store.config()}
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(describe_aggregator(store.config()))
    click.echo(render_round(info, now, stats))


@round_.command("history")
@redis_opt
@redis_tls_opts
@click.option("--last", type=click.IntRange(min=1), default=None, help="only the newest N rounds [default: all]")
@click.option("--json", "as_json", is_flag=True, help="a JSON array, one object per round")
def round_history(redis_url: str, last: int | None, as_json: bool) -> None:
    """One row per round, oldest first: state, sampled, received, merged, late, carried, the means of the
    training loss and accuracy and validation accuracy its devices reported, round time, close latency."""
    from aggregator.round_stats import history
    from aggregator.store import RoundStore
    from ops.control.rounds import render_history

    rows = history(RoundStore.from_url(redis_url), last)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise click.ClickException("no round has been started")
    click.echo(render_history(rows))


@round_.command("watch")
@redis_opt
@redis_tls_opts
@click.option("--interval", type=float, default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one snapshot and exit")
def round_watch(redis_url: str, interval: float, once: bool) -> None:
    """A live table of the newest round: sampled, received, carried, late, per-device latency, loss and
    accuracy, and their means (Ctrl-C stops)."""
    from aggregator.round_stats import round_stats
    from ops.control.rounds import render_round

    store = None
    try:
        while True:
            from aggregator.store import RoundStore

            store = store or RoundStore.from_url(redis_url)
            text = _async_text(store)
            if text is None:
                store, info = _info(redis_url, None, store)
                text = render_round(info, time.time(), round_stats(store, info.round_id))
            if once:
                click.echo(text)
                return
            click.clear()
            click.echo(text + "\n\n(Ctrl-C to stop)")
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


@round_.command("run")
@click.option("--rounds", type=int, required=True, help="rounds to drive back to back")
@plan_options
@click.option("--json", "as_json", is_flag=True, help="one JSON summary per round on stdout")
def round_run(rounds: int, as_json: bool, **kw: Any) -> None:
    """Open R rounds back to back, each once the previous one closed, with a progress bar."""
    _refuse_async(kw["redis_url"])
    from aggregator.round_stats import round_stats
    from aggregator.store import RoundStore
    from ops.control.rounds import round_summary, run_rounds

    core = _core(kw["amqp_url"], kw["redis_url"], kw["task"], kw["width"], kw["seed"])
    store: RoundStore = core.store
    bar = Progress(rounds, "rounds", "round", stream=click.get_text_stream("stderr"))

    def progress(info: Any) -> None:
        bar.set_postfix_str(f"round {info.round_id}: {len(info.received)}/{info.quorum} of {len(info.sampled)}")

    def closed(info: Any) -> None:
        bar.update(1)
        summary = round_summary(info, time.time(), round_stats(store, info.round_id))
        if as_json:
            click.echo(json.dumps(summary))
        else:
            bar.write(f"round {info.round_id} closed in {summary['elapsed_s']:.1f}s: "
                      f"{len(info.received)}/{len(info.sampled)} received, {len(info.carried)} carried, "
                      f"{len(info.late)} late")

    try:
        run = run_rounds(core, store, rounds, _plan(kw), on_round=closed, on_poll=progress)
    except FedMaskError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    times = sorted(run.durations())
    if not as_json:
        click.echo(f"{rounds} rounds; round time median {times[len(times) // 2]:.1f}s, max {times[-1]:.1f}s")
