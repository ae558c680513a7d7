"""`fedmask bench pipeline` and `fedmask bench load` at toy size against the real services: the
figures are positive and consistent with each other, every update is accounted for, and the
sandbox (vhost, device users, Redis keys) is gone afterwards."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import redis

from ops.bench.figures import MB
from ops.bench.load import LoadBenchConfig, run_load_bench
from ops.bench.pipeline import PipelineBenchConfig, run_pipeline_bench
from ops.control.enrolment import Management, ManagementError
from ops.fleet.emulated import AGGREGATOR_PREFIX, LOCK_KEY, mlp_width_for, with_path
from shared.amqp import vhost_user_prefix

pytestmark = pytest.mark.services
BENCH_DB = "13"  # not 15 (the other service tests) nor 14 (the benchmarks' default)


@pytest.fixture()
def bench_redis_url(redis_service_url: str) -> str:
    return with_path(redis_service_url, BENCH_DB)


@pytest.fixture()
def management() -> Management:
    mgmt = Management()
    try:
        mgmt.list_users()
    except ManagementError as exc:  # the sandbox enrols devices through it: under CI it must be there
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"RabbitMQ management API unavailable: {exc}", pytrace=False)
        pytest.skip(f"RabbitMQ management API unavailable: {exc}")
    return mgmt


def _assert_rate(figures: dict[str, float], updates: int) -> None:
    assert figures["updates"] == updates and figures["bytes"] > 0 and figures["seconds"] > 0
    assert figures["updates_per_s"] == pytest.approx(figures["updates"] / figures["seconds"])
    assert figures["mb_per_s"] == pytest.approx(figures["bytes"] / MB / figures["seconds"])


def _assert_cleaned_up(mgmt: Management, redacted_url: str, redis_url: str) -> None:
    vhost = urlsplit(redacted_url).path.lstrip("/")
    auth = "Basic " + base64.b64encode(b"guest:guest").decode()  # Management() defaults to guest as well
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(urllib.request.Request(f"{mgmt.api_url}/api/vhosts/{vhost}",
                                                      headers={"Authorization": auth}), timeout=10)
    assert gone.value.code == 404
    assert not [u for u in mgmt.list_users() if u.startswith(vhost_user_prefix(vhost))]
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match=f"{AGGREGATOR_PREFIX}*".encode())) and not client.exists(LOCK_KEY)


def test_width_sizing_hits_the_requested_parameter_count() -> None:
    w = mlp_width_for("activity", 1_000_000)  # activity: 600 inputs, 7 classes
    assert abs(w * w + 607 * w - 1_000_000) <= w + 607


def test_bench_pipeline_tiny(amqp_service_url: str, bench_redis_url: str, management: Management) -> None:
    r = run_pipeline_bench(PipelineBenchConfig(devices=4, params=20_000, rounds=2, ingest_repeats=2, floor_messages=100,
                                               profile=True,
                                               amqp_url=amqp_service_url, redis_url=bench_redis_url))
    assert r["problems"] == []
    ingest, raw, close = r["ingest"], r["raw"], r["close"]
    _assert_rate(ingest, 4)
    _assert_rate(raw, 4)
    assert ingest["bytes"] == raw["bytes"]  # the same bodies both ways
    assert ingest["seconds_incl_close"] > ingest["seconds"] and ingest["handler_ms_median"] > 0
    assert r["ingest_over_raw"] == pytest.approx(ingest["updates_per_s"] / raw["updates_per_s"])
    assert len(r["ingest_over_raw_all"]) == 2 and r["ingest_over_raw"] in r["ingest_over_raw_all"]
    floor = r["adapter_floor"]
    _assert_rate(floor["raw"], 100)
    _assert_rate(floor["adapter_noop"], 100)
    assert floor["adapter_over_raw"] == pytest.approx(floor["adapter_noop"]["updates_per_s"]
                                                      / floor["raw"]["updates_per_s"])
    assert close["rounds"] == len(close["per_round_s"]) == 2
    assert 0 < close["p50_s"] <= close["p99_s"] <= close["max_s"] == max(close["per_round_s"])
    assert abs(r["config"]["params_actual"] - 20_000) < 1_000
    assert r["profile"]["ingest_top"] and r["profile"]["close_top"]
    _assert_cleaned_up(management, r["config"]["amqp_url"], bench_redis_url)


def test_bench_load_tiny(amqp_service_url: str, bench_redis_url: str, management: Management) -> None:
    r = run_load_bench(LoadBenchConfig(devices=20, rounds=2, bad_rate=0.4, deadline=5.0,
                                       amqp_url=amqp_service_url, redis_url=bench_redis_url))
    assert r["problems"] == [] and r["rounds_completed"] == 2
    a = r["accounting"]
    assert a["vanished"] == 0
    assert a["sent"] == a["merged"] + a["rejected"] + a["duplicates_acked"] > 0
    assert a["dead_letters_by_reason"] == a["rejected_by_reason"]
    assert set(a["injected"]) == {"duplicate", "wrong_length", "not_sampled", "undecodable"}
    assert a["rejected_by_reason"]["bad_length"] == a["injected"]["wrong_length"]
    assert a["rejected_by_reason"]["undecodable"] == a["injected"]["undecodable"]
    t = r["throughput"]
    assert t["updates"] == a["sent"] and t["updates_per_s"] == pytest.approx(t["updates"] / t["seconds"])
    assert 0 < r["close"]["p50_s"] <= r["close"]["p99_s"] <= r["close"]["max_s"]
    assert r["aggregator_peak_rss_mb"] is None or r["aggregator_peak_rss_mb"] > 0
    _assert_cleaned_up(management, r["config"]["amqp_url"], bench_redis_url)
