"""The real pipeline with delta-coded workers (`fedmask worker --coding delta`): one aggregator and six
worker processes over RabbitMQ and Redis, three rounds; every device's final mask equals the raw-coded
simulator's bit for bit, every update and merged mask went delta-coded, and nothing was refused."""

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
                        worker_args=["--coding", "delta"], first=N) as p:
        yield p


def test_delta_workers_match_the_raw_simulator(pipeline: dict[str, object], redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    data: FederatedDataset = pipeline["data"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    wait(lambda: sorted(store.device_ids()) == sorted(ids), 120, "every worker's hello")
    urls = ["--amqp-url", str(pipeline["admin_url"]), "--redis-url", redis_service_url]
    run = cli("round", "run", "--rounds", str(ROUNDS), "--quorum", "1.0", "--deadline", "120", "--json", *urls)
    assert run.returncode == 0, run.stderr
    assert all(json.loads(line)["received"] == N for line in run.stdout.splitlines())
    wait(lambda: all(store.mask_version(d) == ROUNDS for d in ids), 30, "masks stored")
    time.sleep(2)  # workers persist the last mask they received
    assert not [k for k in store.counters() if k.startswith("rejected:")], store.counters()

    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=preset(TASK).local_epochs)  # raw
    sim = run_fedmask(subset(data, ids), spec, cfg, rounds=ROUNDS, sample_rate=1.0, seed=SEED, merge="head",
                      save_dir=tmp / "sim")
    up = down = 0
    for d in ids:
        worker = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        worker.load(tmp / "state" / f"{d}.npz")
        twin = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        twin.load(tmp / "sim" / f"{d}.npz")
        assert worker.mask_version == ROUNDS
        assert np.array_equal(worker.model.mask_bits(), twin.model.mask_bits()), f"{d}: delta pipeline != simulator"
        lines = [json.loads(x) for x in (tmp / "state" / f"{d}.stats.jsonl").read_text().splitlines()]
        masks = [x for x in lines if x["type"] == "mask"]
        assert len(masks) == ROUNDS and {x["enc"] for x in masks} == {"delta"}
        up += sum(x["bytes_up"] for x in lines if x["type"] == "update")
        down += sum(x["bytes_down"] for x in masks)
    assert up < sim.extra["update_bytes"] and down < 0.5 * sim.downlink_bytes
