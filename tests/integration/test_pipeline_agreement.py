"""The agreement variants through the real pipeline: one aggregator and six workers started with
--variant fedmask-agree (or fedmask-adapt, whose devices choose their share on their own validation
split, or fedmask-adapt-local, the same choice over fedmask-local's thresholded masks),
three rounds; every device's final scores, personal head and mask bits must
equal the simulator's (run_variant) bit for bit, and every downlink is agreement levels (enc q4) at
4 bits per structure element."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.store import RoundStore
from shared.data import FederatedDataset
from shared.device import DeviceRuntime
from shared.presets import model_spec, tuned_config
from shared.sim.variants import run_variant
from shared.variant_setup import variant_setup
from tests.integration.pipeline_fleet import ROUNDS, SEED, TASK, WIDTH, N, cli, start_pipeline, subset, wait

pytestmark = pytest.mark.services


@pytest.fixture(params=["fedmask-agree", pytest.param("fedmask-adapt", marks=pytest.mark.exhaustive),
                        pytest.param("fedmask-adapt-local", marks=pytest.mark.exhaustive)])
def pipeline(request: pytest.FixtureRequest, amqp_service_url: str, redis_service_url: str,
             tmp_path: Path) -> Iterator[dict[str, object]]:
    flags = ["--variant", request.param]
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, aggregator_args=flags,
                        worker_args=flags) as p:
        yield {**p, "variant": request.param}


def _mask_records(state_dir: Path, device: str) -> list[dict[str, Any]]:
    """The worker's own log of the mask messages it applied (shared with ops/fleet/workers.py)."""
    lines = (state_dir / f"{device}.stats.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "mask"]


def test_agreement_pipeline_matches_simulator(pipeline: dict[str, object], redis_service_url: str) -> None:
    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    data: FederatedDataset = pipeline["data"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    variant = str(pipeline["variant"])
    wait(lambda: sorted(store.device_ids()) == sorted(ids), 180, "every worker's hello")
    upload = "threshold" if variant == "fedmask-adapt-local" else "sample"  # local's thresholded masks
    assert store.config()["variant"] == variant and store.config()["upload"] == upload
    urls = ["--amqp-url", str(pipeline["admin_url"]), "--redis-url", redis_service_url]
    run = cli("round", "run", "--rounds", str(ROUNDS), "--quorum", "1.0", "--deadline", "240", "--json", *urls)
    assert run.returncode == 0, run.stderr
    summaries = [json.loads(line) for line in run.stdout.splitlines()]
    assert [x["round"] for x in summaries] == [1, 2, 3]
    assert all(x["state"] == "closed" and x["received"] == x["sampled"] == N for x in summaries)
    shown = cli("round", "status", "--redis-url", redis_service_url).stdout
    assert f"variant {variant} (merge agreement, upload {upload})" in shown
    wait(lambda: all(store.mask_version(d) == ROUNDS for d in ids), 30, "masks stored")
    state = tmp / "state"
    wait(lambda: all(len(_mask_records(state, d)) == ROUNDS for d in ids), 30, "workers to persist the last mask")

    # The simulator's own path for the variant on the same six devices, all sampled every round.
    cfg = replace(tuned_config(TASK, variant).config, final_local_epochs=0)  # the pipeline has no final adaptation
    run_variant(cfg, subset(data, ids), model_spec(TASK, width=WIDTH, seed=SEED), rounds=ROUNDS, sample_rate=1.0,
                seed=SEED, save_devices=tmp / "sim")
    setup = variant_setup(TASK, variant, width=WIDTH, seed=SEED)
    for d in ids:
        worker = DeviceRuntime(d, setup.spec, setup.fedmask, (np.zeros(0), np.zeros(0)), seed=SEED)
        worker.load(state / f"{d}.npz")
        sim = DeviceRuntime(d, setup.spec, setup.fedmask, (np.zeros(0), np.zeros(0)), seed=SEED)
        sim.load(tmp / "sim" / f"{d}.npz")
        assert worker.mask_version == sim.mask_version == ROUNDS
        assert np.array_equal(worker.structure, sim.structure)
        assert np.array_equal(worker.model.scores_flat(), sim.model.scores_flat()), f"{d}: scores differ"
        assert np.array_equal(worker.model.mask_bits(), sim.model.mask_bits()), f"{d}: mask bits differ"
        for name, value in worker.model.state_dict().items():  # the personal head (real-valued) too
            assert np.array_equal(value.numpy(), sim.model.state_dict()[name].numpy()), f"{d}: {name} differs"

        # Bytes: the payload (Redis keeps it as published) is exactly 4 bits per structure element; the
        # encoded message adds a header that does not grow with the model (names, hashes, crc, version):
        # here ~1.5k elements, so 4.85 bits per element in all.
        inside = int(worker.model.structure_bits().sum())
        payload = (inside + 1) // 2
        stored = store.mask(d)
        assert stored is not None and len(stored[0]) == payload
        masks = _mask_records(state, d)
        assert [m["enc"] for m in masks] == ["q4"] * ROUNDS
        assert all(0 < m["bytes_down"] - payload < 200 for m in masks), (d, masks, inside)
