"""The demo's rhythm plumbing without services: the mode line, the aggregator's command line in async
mode, the refusal of --mode async with --strategy, and the learning-over-time reading of the boards'
records that the comparison of rhythms rests on (ops/demo/curves.py, ops/demo/compare.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ops.cli.demo import demo
from ops.demo import compare
from ops.demo.curves import at, fleet_curve, mean_curve, time_to
from ops.demo.run import DemoSettings
from ops.services import aggregator_process
from ops.services.deployment import Deployment


def test_mode_line_says_which_mode_and_why() -> None:
    assert DemoSettings().mode_line().startswith("mode rounds (quorum 0.7, late carry): the default")
    assert "every round waits for the slowest board" in DemoSettings(quorum=1.0).mode_line()
    line = DemoSettings(mode="async", buffer=3, staleness="sqrt").mode_line()
    assert line.startswith("mode async (K=3, max staleness 10, sqrt weights), asked by --mode async")
    assert "\n" not in line


def test_async_with_a_strategy_is_refused() -> None:
    res = CliRunner().invoke(demo, ["--mode", "async", "--strategy", "feddst"])
    assert res.exit_code == 2 and "--mode async trains FedMask masks only: drop --strategy" in res.output


def test_async_deployment_passes_the_async_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def popen(cmd: list[str], **_: Any) -> None:
        seen.append(cmd)
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(aggregator_process, "started_here", lambda _dep: set())
    dep = Deployment(amqp_url="amqp://g:g@127.0.0.1:5672/v", redis_url="redis://127.0.0.1:6379/3", run_dir=tmp_path,
                     mode="async", buffer=4, max_staleness=7, staleness="sqrt")
    with pytest.raises(Stop):
        aggregator_process.start_aggregator(dep, say=lambda _m: None)
    cmd = seen[0]
    i = cmd.index("--mode")
    assert cmd[i:i + 8] == ["--mode", "async", "--buffer", "4", "--max-staleness", "7", "--staleness", "sqrt"]
    seen.clear()
    with pytest.raises(Stop):
        aggregator_process.start_aggregator(Deployment(dep.amqp_url, dep.redis_url, tmp_path), say=lambda _m: None)
    assert "--mode" not in seen[0]


def _write(state: Path, device: str, recs: list[dict[str, Any]]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / f"{device}.stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_curve_holds_each_boards_latest_report(tmp_path: Path) -> None:
    _write(tmp_path, "a", [{"t": 100.0, "type": "hello"}, {"t": 100.0, "type": "task", "round": 1},
                           {"t": 104.0, "type": "update", "round": 1, "val_accuracy": 0.4},
                           {"t": 109.0, "type": "update", "round": 2, "val_accuracy": 0.6},
                           {"t": 111.0, "type": "update", "round": 3, "val_accuracy": 0.9, "resent": True}])
    _write(tmp_path, "b", [{"t": 101.0, "type": "task", "round": 1},
                           {"t": 112.0, "type": "update", "round": 1, "val_accuracy": 0.2}])
    c = fleet_curve(tmp_path, {"a": "jetson", "b": "pi4"}, horizon_s=14.0)
    assert c["t0"] == 100.0
    rows = {r["t"]: (r["boards"], r["mean_val_accuracy"]) for r in c["curve"]}
    assert rows[0.0] == (0, None) and rows[5.0] == (1, 0.4) and rows[10.0] == (1, 0.6)  # the resent one not counted
    assert rows[14.0][0] == 2 and rows[14.0][1] == pytest.approx(0.4)
    assert time_to(c["curve"], 0.5, 2) is None and time_to(c["curve"], 0.4, 2) == 14.0  # only once both reported
    assert at(c["points"]["b"], 11.0) is None and at(c["points"]["b"], 12.0) == 0.2


def test_comparison_summary_sets_target_from_sync_all(tmp_path: Path) -> None:
    def run(points: dict[str, list[tuple[float, float]]], merges: int) -> dict[str, Any]:
        grid = [float(t) for t in range(0, 101, 5)]
        devices = {d: {"profile": "pi4" if d == "slow" else "jetson", "accuracy_merged": 0.5} for d in points}
        return {"curve": {"curve": mean_curve(points, grid), "points": points},
                "profiles": {d: r["profile"] for d, r in devices.items()},
                "report": {"devices": devices, "mean_accuracy_merged": 0.5, "mean_accuracy_final": 0.6,
                           "wall_seconds": 130.0, "rounds": [{}] * merges}}

    runs = {"sync-all": run({"fast": [(50.0, 0.5), (100.0, 0.8)], "slow": [(50.0, 0.5), (100.0, 0.8)]}, 2),
            "quorum": run({"fast": [(10.0, 0.8)], "slow": [(40.0, 0.7)]}, 9),
            "async": run({"fast": [(10.0, 0.9)], "slow": [(20.0, 0.8)]}, 5)}
    out = compare.summarize(runs, 100.0, DemoSettings(workers=2, pi4=1))
    assert out["sync_all_final_mean_val"] == pytest.approx(0.8) and out["target"] == pytest.approx(0.76)
    m = out["modes"]
    assert m["sync-all"]["time_to_target_s"] == 100.0 and m["sync-all"]["speedup_vs_sync_all"] == 1.0
    assert m["quorum"]["time_to_target_s"] is None and m["quorum"]["speedup_vs_sync_all"] is None  # 0.75 < 0.76
    assert m["async"]["time_to_sync_all_final_s"] == 20.0 and m["sync-all"]["time_to_sync_all_final_s"] == 100.0
    assert m["async"]["time_to_target_s"] == 20.0 and m["async"]["speedup_vs_sync_all"] == pytest.approx(5.0)
    assert m["async"]["slow_final_val"] == pytest.approx(0.8) and m["quorum"]["slow_final_val"] == pytest.approx(0.7)
    assert m["async"]["updates_within_budget"] == {"jetson": 1, "pi4": 1} and m["quorum"]["merges"] == 9
    assert "async" in compare.render(out)
    compare.plot_compare(out, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert m["async"]["slow_curve"][2] == {"t": 20.0, "boards": 1, "mean_val_accuracy": 0.8}
