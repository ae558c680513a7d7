"""The real pipeline, end to end: one aggregator process and six worker processes over RabbitMQ
and Redis, three rounds; every device's final mask must equal the simulator's, bit for bit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import RoundStore
from shared.data import FederatedDataset
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.sim.fedmask import run_fedmask
from tests.integration.pipeline_fleet import ROUNDS, SEED, TASK, WIDTH, N, cli, start_pipeline, subset, wait

pytestmark = pytest.mark.services


@pytest.fixture()
def pipeline(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, aggregator_args=["--merge", "head"],
                        worker_args=[]) as p:
        yield p


def test_pipeline_matches_simulator(pipeline: dict[str, object], redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    data: FederatedDataset = pipeline["data"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    wait(lambda: sorted(store.device_ids()) == sorted(ids), 120, "every worker's hello")
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    # The operator's command drives the rounds; task and width come from the running aggregator.
    urls = ["--amqp-url", str(pipeline["admin_url"]), "--redis-url", redis_service_url]
    run = cli("round", "run", "--rounds", str(ROUNDS), "--quorum", "1.0", "--deadline", "120", "--json", *urls)
    assert run.returncode == 0, run.stderr
    summaries = [json.loads(line) for line in run.stdout.splitlines()]
    assert [x["round"] for x in summaries] == [1, 2, 3]
    assert all(x["state"] == "closed" and x["received"] == x["sampled"] == N for x in summaries)
    assert all(0 <= x["close_latency_s"] < 5 for x in summaries)
    status = cli("round", "status", "--json", "--redis-url", redis_service_url)
    assert status.returncode == 0, status.stderr
    devices = json.loads(status.stdout)["devices"]
    assert sorted(d["device"] for d in devices) == sorted(ids) and {d["state"] for d in devices} == {"received"}
    assert all(d["seconds"] > 0 for d in devices)
    shown = cli("round", "status", "--redis-url", redis_service_url).stdout
    assert "variant preset (merge head, upload threshold)" in shown
    watch = cli("round", "watch", "--once", "--redis-url", redis_service_url)
    assert watch.returncode == 0 and f"round {ROUNDS}  closed" in watch.stdout and ids[0] in watch.stdout
    wrong = cli("round", "start", "--task", "mnist", *urls)  # not the model the aggregator serves
    assert wrong.returncode != 0 and "serves digits" in wrong.stderr
    wait(lambda: all(store.mask_version(d) == ROUNDS for d in ids), 30, "masks stored")
    time.sleep(2)  # workers persist the last mask they received

    # The simulator on the same six devices, all sampled every round, same seeds.
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=preset(TASK).local_epochs)
    run_fedmask(subset(data, ids), spec, cfg, rounds=ROUNDS, sample_rate=1.0, seed=SEED, merge="head",
                save_dir=tmp / "sim")
    for d in ids:
        worker = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        worker.load(tmp / "state" / f"{d}.npz")
        sim = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        sim.load(tmp / "sim" / f"{d}.npz")
        assert worker.mask_version == ROUNDS
        assert np.array_equal(worker.model.mask_bits(), sim.model.mask_bits()), f"{d}: pipeline != simulator"
        assert np.array_equal(worker.structure, sim.structure)
