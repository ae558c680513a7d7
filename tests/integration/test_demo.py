"""`fedmask demo` at a small size: services, enrolment, worker processes, rounds on a quorum with a
slow board, evaluation, report and plot — the same code path as `make demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.demo.metrics_scrape import REPORTED

pytestmark = pytest.mark.services


def _env() -> dict[str, str]:
    """No Docker; a private broker's management API when the tests were given one."""
    env = {**os.environ, "FEDMASK_NO_DOCKER": "1"}
    if os.environ.get("FEDMASK_TEST_MANAGEMENT_URL"):
        env["FEDMASK_DEMO_API_URL"] = os.environ["FEDMASK_TEST_MANAGEMENT_URL"]
    return env


def test_small_demo_runs_end_to_end(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = _env()
    res = subprocess.run([sys.executable, "-m", "ops.cli", "demo", "--workers", "3", "--pi4", "1", "--rounds", "3",
                          "--quorum", "0.6", "--amqp-url", amqp_service_url, "--redis-url", redis_service_url,
                          "--out", str(out)], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mode rounds (quorum 0.6, late carry): the default" in res.stderr  # which mode and why, one line
    report = json.loads((out / "report.json").read_text())
    assert (out / "pipeline.png").stat().st_size > 10_000
    assert len(report["rounds"]) == 3 and all(r["received"] >= 1 for r in report["rounds"])
    devices = report["devices"]
    assert sorted(d["profile"] for d in devices.values()) == ["jetson", "jetson", "pi4"]
    assert all(d["updates"] >= 1 and d["bytes_up"] > 0 and 0 <= d["accuracy_final"] <= 1 for d in devices.values())
    # quorum 0.6 of 3 = 2: the rounds close on the two Jetsons, before the Pi 4's first update
    assert report["turnaround_seconds_by_profile"]["pi4"] > report["turnaround_seconds_by_profile"]["jetson"]
    assert "mean personalized accuracy" in res.stdout
    # The aggregator's /metrics endpoint, scraped during the run: every counter family is there.
    metrics = report["metrics"]
    assert metrics["scrapes"] >= 4 and metrics["missing"] == [] and set(REPORTED) <= set(metrics["families"])
    last = metrics["last"]
    assert last["fedmask_rounds_closed_total"] == 3 and last["fedmask_devices_enrolled"] == 3
    assert last["fedmask_updates_stored_total"] == sum(r["received"] for r in report["rounds"])
    assert last["fedmask_updates_received_total"] >= last["fedmask_updates_stored_total"]
    assert last["fedmask_round_close_seconds_count"] == 3
    assert "metrics (" in res.stdout and "late updates carried" in res.stdout
    # The devices' own validation accuracy, averaged per round, is in the report (and the plot).
    assert [r["round"] for r in report["learning"]] == [1, 2, 3]
    assert all(0 <= r["mean_val_accuracy"] <= 1 for r in report["learning"])
    assert "mean validation accuracy per round" in res.stdout


# Further cases of the demo family (about 70 s each): make test runs the main demo above, and the
# strategy and async paths through the broker in test_strategy_broker.py and test_pipeline_async.py;
# these run under FEDMASK_EXHAUSTIVE=1 (make test-all, make faults).
@pytest.mark.exhaustive
def test_small_demo_with_a_strategy(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> None:
    """`fedmask demo --strategy feddst`: the same fleet trains FedDST's sparse weights; late updates
    are dropped (said in one line), and each board is scored with the server's model, as the simulator does."""
    out = tmp_path / "demo"
    env = _env()
    res = subprocess.run([sys.executable, "-m", "ops.cli", "demo", "--strategy", "feddst", "--workers", "3", "--pi4",
                          "1", "--rounds", "3", "--quorum", "0.6", "--amqp-url", amqp_service_url, "--redis-url",
                          redis_service_url, "--out", str(out)], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "strategy feddst: late updates are dropped" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["strategy"] == "feddst" and len(report["rounds"]) == 3
    assert all(r["received"] >= 2 and r["carried"] == 0 for r in report["rounds"])
    devices = report["devices"]
    assert all(d["updates"] >= 1 and d["bytes_up"] > 0 for d in devices.values())
    # A trained model, not chance (6 activity classes): the Jetsons took part in every round.
    assert sum(d["accuracy_merged"] for d in devices.values()) / len(devices) > 0.3
    assert report["metrics"]["last"]["fedmask_rounds_closed_total"] == 3
    assert "strategy feddst: mean personalized accuracy" in res.stdout


# A further case of the demo family, as the one above.
@pytest.mark.exhaustive
def test_small_demo_in_async_mode(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> None:
    """`fedmask demo --mode async`: no rounds are opened; the aggregator tasks each board itself and
    flushes every K=2 stored updates; the demo stops after 3 flushes with every board merged, and the
    report holds the flushes, every device's updates and merged mask, and learning over time."""
    out = tmp_path / "demo"
    env = _env()
    res = subprocess.run([sys.executable, "-m", "ops.cli", "demo", "--mode", "async", "--buffer", "2", "--flushes", "3",
                          "--deadline", "240", "--workers", "3", "--pi4", "1", "--amqp-url", amqp_service_url,
                          "--redis-url", redis_service_url, "--out", str(out)],
                         capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mode async (K=2, max staleness 10, sqrt weights), asked by --mode async" in res.stderr
    assert "closed in" not in res.stderr and "no rounds to open" in res.stderr  # nothing opened a round
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "async" and (out / "pipeline.png").stat().st_size > 10_000
    st = report["stream"]
    assert st["mode"] == "async" and st["buffer_k"] == 2 and st["staleness"] == "sqrt"
    assert st["flushes"] >= 3 and len(report["flushes"]) == st["flushes"] == st["version"]
    # None lost: every stored update was merged, replaced by its board's next one, or is still buffered.
    assert st["stored"] == st["merged"] + st["replaced"] + st["buffered"] and st["duplicate"] == 0
    devices = report["devices"]
    assert sorted(d["profile"] for d in devices.values()) == ["jetson", "jetson", "pi4"]
    for d, r in devices.items():  # every board, the slow one included, sent updates and got a merged mask
        assert r["updates"] >= 1 and r["flushes"] >= 1 and r["mask_version"] >= 1, (d, r)
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and 0 <= r["accuracy_final"] <= 1
    assert {str(m) for f in report["flushes"] for m in f["devices"]} == set(devices)
    assert report["turnaround_seconds_by_profile"]["pi4"] > report["turnaround_seconds_by_profile"]["jetson"]
    curve = [r for r in report["learning_over_time"] if r["mean_val_accuracy"] is not None]
    assert curve and curve[-1]["boards"] == 3 and all(0 <= r["mean_val_accuracy"] <= 1 for r in curve)
    last = report["metrics"]["last"]
    assert last["fedmask_devices_enrolled"] == 3 and 1 <= last["fedmask_updates_stored_total"] <= st["stored"]
    assert "async stream (K=2" in res.stdout and "mean personalized accuracy" in res.stdout
