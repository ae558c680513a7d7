"""The real aggregator process serves /metrics: after one round driven by `fedmask round run` through
RabbitMQ and worker processes, a scrape shows every counter family with the round's figures, and
`round status`, `round watch` and `round history --json` show what the devices reported."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.store import RoundStore
from tests.integration.pipeline_fleet import N, cli, start_pipeline, wait
from tests.private_services import PrivateRedis, free_port

pytestmark = pytest.mark.services


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_endpoint_after_a_round(amqp_service_url: str, tmp_path: Path) -> None:
    port = free_port()
    # A redis-server of this test's own: start_pipeline resets the service's keys, and other suites
    # running at the same time against the machine's Redis would otherwise see (and reset) ours.
    with PrivateRedis(tmp_path / "redis") as redis_server, \
            start_pipeline(amqp_service_url, redis_server.url(), tmp_path,
                           aggregator_args=["--merge", "head", "--metrics-port", str(port)], worker_args=[]) as p:
        redis_service_url = redis_server.url()
        store: RoundStore = p["store"]
        ids: list[str] = p["ids"]
        wait(lambda: sorted(store.device_ids()) == sorted(ids), 120, "every worker's hello")
        urls = ["--amqp-url", str(p["admin_url"]), "--redis-url", redis_service_url]
        run = cli("round", "run", "--rounds", "1", "--quorum", "1.0", "--deadline", "120", "--json", *urls)
        assert run.returncode == 0, run.stderr
        assert "\r" not in run.stderr  # not a terminal: no bar frames

        m = scrape(port)
        assert m[("fedmask_redis_up", ())] == 1
        assert m[("fedmask_hellos_received_total", ())] >= N  # a restarted worker says hello again
        assert m[("fedmask_updates_received_total", ())] == N
        assert m[("fedmask_updates_stored_total", ())] == N
        assert m[("fedmask_updates_duplicate_total", ())] == 0
        assert not [k for k in m if k[0] == "fedmask_updates_rejected_total"]  # nothing refused
        assert {k[1]: v for k, v in m.items() if k[0] == "fedmask_late_updates_total"} == \
            {(("outcome", o),): 0 for o in ("carried", "dropped", "expired", "parked", "replaced", "superseded")}
        assert m[("fedmask_rounds_closed_total", ())] == 1
        assert m[("fedmask_round_close_seconds_count", ())] == 1 and 0 <= m[("fedmask_round_close_seconds_sum", ())] < 5
        assert m[("fedmask_round_current", ())] == 1 and m[("fedmask_round_state", (("state", "closed"),))] == 1
        assert m[("fedmask_devices_enrolled", ())] == N == m[("fedmask_devices_alive", ())]
        assert m[("fedmask_devices_unreachable", ())] == 0
        assert 0 < m[("fedmask_round_mean_val_accuracy", ())] <= 1

        history = cli("round", "history", "--json", "--redis-url", redis_service_url)
        assert history.returncode == 0, history.stderr
        (row,) = json.loads(history.stdout)
        assert (row["round"], row["state"], row["sampled"], row["received"], row["merged"], row["late"]) == \
            (1, "closed", N, N, N, 0)
        assert row["reported_stats"] == N and 0 < row["mean_val_accuracy"] <= 1
        assert 0 <= row["mean_train_accuracy"] <= 1 and row["mean_train_loss"] > 0
        assert row["mean_val_accuracy"] == pytest.approx(m[("fedmask_round_mean_val_accuracy", ())])
        assert 0 <= row["close_latency_s"] < 5

        status = json.loads(cli("round", "status", "--json", "--redis-url", redis_service_url).stdout)
        assert status["mean_val_accuracy"] == pytest.approx(row["mean_val_accuracy"])
        assert all(0 <= d["val_accuracy"] <= 1 and d["loss"] > 0 for d in status["devices"])
        watch = cli("round", "watch", "--once", "--redis-url", redis_service_url).stdout
        assert "val acc" in watch and f"val acc {row['mean_val_accuracy']:.3f}" in watch
        text = cli("round", "history", "--redis-url", redis_service_url).stdout
        assert text.splitlines()[1].split()[:5] == ["1", "closed", str(N), str(N), str(N)]
