"""The metric registry without services: every family the aggregator exports, how deliveries and closes
are counted, the Grafana dashboard against the exported names, the demo's scrape summary, the history
table, and progress bars that animate only on a terminal."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from aggregator.metrics import DEFAULT_METRICS_PORT, AggregatorMetrics, StoreCollector, StoreSnapshot
from aggregator.round_stats import history_row, mean_stats, stats_row
from aggregator.store import RoundInfo, StoreError
from ops.cli.pipeline import DEFAULT_METRICS_PORT as CLI_DEFAULT_PORT
from ops.cli.progress import Progress
from ops.control.rounds import render_history, render_round
from ops.demo.metrics_scrape import REPORTED, Scraper, parse, render
from shared.codec import Stats

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "deploy" / "grafana" / "fedmask-dashboard.json"


def _info(state: str = "closed") -> RoundInfo:
    return RoundInfo(round_id=7, state=state, opened_at=100.0, deadline=400.0, quorum=2, sampled=["a", "b", "c"],
                     received=["a", "b"], late=["c"], carried=[], arrivals={"a": 1.5, "b": 2.0},
                     closing_at=102.0 if state != "open" else None, closed_at=102.25 if state == "closed" else None,
                     policy={})


STATS = {"a": {"loss": 0.5, "accuracy": 0.8, "val_accuracy": 0.7, "samples": 100.0},
         "b": {"loss": 0.3, "accuracy": 0.9, "val_accuracy": 0.9, "samples": 50.0}}
SNAP = StoreSnapshot(counters={"updates:stored": 12, "updates:duplicate": 1, "rejected:undecodable": 2,
                               "rejected:round_closed": 1, "late:carried": 3, "late:dropped": 1,
                               "late:replaced": 1, "late:later_kind": 2, "rounds:closed": 6, "unreachable:marked": 1},
                     enrolled=4, alive=3, unreachable=1, parked=1, current=_info(), means=mean_stats(STATS))


class NoRedis:
    """A store whose every call fails as an unreachable Redis does."""

    def __getattr__(self, name: str) -> Any:
        def fail(*_a: object, **_k: object) -> None:
            raise StoreError(f"redis {name} failed: ConnectionError", retryable=True)
        return fail


class OneRound(NoRedis):
    def info(self, round_id: int) -> RoundInfo:
        return _info()


@pytest.fixture()
def metrics(monkeypatch: pytest.MonkeyPatch) -> AggregatorMetrics:
    """AggregatorMetrics whose Redis reads return SNAP."""
    monkeypatch.setattr(StoreCollector, "read", lambda self: SNAP)
    return AggregatorMetrics(OneRound())  # type: ignore[arg-type]


def samples(m: AggregatorMetrics) -> dict[str, float]:
    return parse(generate_latest(m.registry).decode())[1]


def test_every_family_is_exported_with_the_store_counters(metrics: AggregatorMetrics) -> None:
    s = samples(metrics)
    assert s["fedmask_updates_stored_total"] == 12 and s["fedmask_updates_duplicate_total"] == 1
    assert s["fedmask_updates_rejected_total{reason=undecodable}"] == 2
    assert s["fedmask_updates_rejected_total{reason=round_closed}"] == 1
    assert s["fedmask_late_updates_total{outcome=carried}"] == 3
    assert s["fedmask_late_updates_total{outcome=expired}"] == 0  # known outcomes are there from the start
    assert s["fedmask_late_updates_total{outcome=replaced}"] == 1
    assert s["fedmask_late_updates_total{outcome=superseded}"] == 0
    assert s["fedmask_late_updates_total{outcome=later_kind}"] == 2  # a late:<x> counter added later shows too
    assert s["fedmask_store_events_total{counter=unreachable:marked}"] == 1  # and any other counter
    assert s["fedmask_rounds_closed_total"] == 6
    assert (s["fedmask_devices_enrolled"], s["fedmask_devices_alive"], s["fedmask_devices_unreachable"]) == (4, 3, 1)
    assert s["fedmask_late_updates_parked"] == 1
    assert s["fedmask_round_current"] == 7 and s["fedmask_round_state{state=closed}"] == 1
    assert s["fedmask_round_state{state=open}"] == 0 and s["fedmask_round_devices{set=late}"] == 1
    assert s["fedmask_round_mean_val_accuracy"] == pytest.approx(0.8)
    assert s["fedmask_round_mean_train_loss"] == pytest.approx(0.4)
    assert s["fedmask_redis_up"] == 1


def test_describe_names_every_family_collect_yields() -> None:
    described = {m.name for m in StoreCollector(NoRedis()).describe()}  # type: ignore[arg-type]
    collected = {m.name for m in _collect_snapshot()}
    assert described == collected


def _collect_snapshot() -> list[Any]:
    collector = StoreCollector(NoRedis())  # type: ignore[arg-type]
    collector.read = lambda: SNAP  # type: ignore[method-assign]
    return list(collector.collect())


def test_deliveries_are_counted_by_kind_and_closes_timed() -> None:
    m = AggregatorMetrics(OneRound())  # type: ignore[arg-type]
    for key in ("device.a.update", "device.a.update", "device.a.hello", "device.b.shello", "device.a.whatever",
                "garbage"):
        m.received(key)
    m.observe_close(OneRound(), 7)  # type: ignore[arg-type]  # 0.25 s from election to closed
    m.observe_close(NoRedis(), 8)  # type: ignore[arg-type]  # Redis gone: logged, not raised
    s = samples(m)
    assert s["fedmask_updates_received_total"] == 4 and s["fedmask_hellos_received_total"] == 2  # shello too
    assert s["fedmask_round_close_seconds_count"] == 1 and s["fedmask_round_close_seconds_sum"] == 0.25
    assert s["fedmask_round_close_seconds_bucket{le=0.1}"] == 0
    assert s["fedmask_round_close_seconds_bucket{le=0.25}"] == 1
    assert s["fedmask_redis_up"] == 0 and "fedmask_updates_stored_total" not in s  # Redis unreachable: said so


def test_port_zero_serves_nothing_and_the_cli_default_is_the_documented_one() -> None:
    assert AggregatorMetrics(NoRedis()).serve("127.0.0.1", 0) is None  # type: ignore[arg-type]
    assert CLI_DEFAULT_PORT == DEFAULT_METRICS_PORT == 9811
    assert "9811" in (ROOT / "docs" / "metrics.md").read_text()


def test_dashboard_reads_only_metrics_the_aggregator_exports(metrics: AggregatorMetrics) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bfedmask_[a-z_]+", e)}
    exported = {k.split("{")[0] for k in samples(metrics)}
    assert used and used <= exported, sorted(used - exported)
    # A panel for every counter and histogram family, and for every gauge family.
    text = generate_latest(metrics.registry).decode()
    families = {m.group(1) for m in re.finditer(r"^# TYPE (fedmask_\w+) (counter|histogram|gauge)$", text, re.M)
                if not m.group(1).endswith("_created")}  # the client's creation timestamps, not ours
    assert {f.removesuffix("_total") for f in families} <= {u.removesuffix("_total").removesuffix("_bucket")
                                                             .removesuffix("_sum").removesuffix("_count") for u in used}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_the_demo_scrape_summary_lists_every_reported_name(metrics: AggregatorMetrics) -> None:
    text = generate_latest(metrics.registry).decode()
    clock = iter([10.0, 20.0])
    scraper = Scraper("http://x/metrics", clock=lambda: next(clock))
    scraper.scrapes = [(10.0, *parse(text))]
    scraper.scrapes.append((20.0, *parse(text.replace("fedmask_updates_stored_total 12.0",
                                                      "fedmask_updates_stored_total 22.0"))))
    summary = scraper.summary()
    assert summary["missing"] == [] and set(REPORTED) <= set(summary["families"])
    assert summary["ingest_updates_per_s"] == pytest.approx(1.0)
    shown = render(summary)
    for words in ("updates received 0", "stored 22", "rejected 3 (", "undecodable 2", "duplicates 1",
                  "carried 3", "dropped 1", "expired 0", "alive 3", "unreachable 1", "round 7 closed",
                  "ingest 1.00 updates/s", "mean val acc 0.800"):
        assert words in shown, words
    assert "no scrape" in render(Scraper("http://x/metrics").summary())


def test_stats_rows_means_and_the_history_table() -> None:
    assert stats_row(Stats(samples=3, loss=0.5, val_accuracy=0.25)) == {"samples": 3, "loss": 0.5, "val_accuracy": 0.25}
    assert stats_row(None) == {}
    assert mean_stats({}) == {"mean_train_loss": None, "mean_train_accuracy": None, "mean_val_accuracy": None}
    row = history_row(_info(), STATS)
    assert (row["merged"], row["late"], row["reported_stats"], row["close_latency_s"]) == (2, 1, 2, 0.25)
    assert row["mean_val_accuracy"] == pytest.approx(0.8) and row["duration_s"] == 2.25
    assert history_row(_info("open"), {})["merged"] is None
    table = render_history([row, history_row(_info("open"), {})])
    assert table.splitlines()[1].split() == ["7", "closed", "3", "2", "2", "1", "0", "0.4000", "0.850", "0.800",
                                             "2.2", "250"]
    assert table.splitlines()[2].split()[:5] == ["7", "open", "3", "2", "-"]
    shown = render_round(_info(), 110.0, STATS)
    assert "val acc 0.800" in shown and "0.700" in shown and "train loss 0.4000" in shown


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_writes_no_frames_off_a_terminal() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = Progress(10, "rounds", "round", stream=out, every_s=30, clock=clock)
    assert not bar.animated
    for _ in range(9):
        clock.t += 5
        bar.update()
        bar.set_postfix_str("3/4 received")
    bar.write("round 9 closed")
    bar.update()
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # 45 s of updates every 5 s: one status line at 30 s, the message, one line at the end.
    assert lines == ["rounds: 6/10 rounds, 30s [3/4 received]", "round 9 closed",
                     "rounds: 10/10 rounds, 45s [3/4 received]"]
    quiet = io.StringIO()
    short = Progress(3, "trial", stream=quiet, leave=False, every_s=30, clock=FakeClock())
    short.update(3)
    short.close()
    assert quiet.getvalue() == ""  # a bar that is not kept says nothing when it ends


def test_progress_animates_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = Progress(2, "rounds", stream=out)
    assert bar.animated
    bar.update()
    bar.close()
    assert "\r" in out.getvalue()  # tqdm's frames
