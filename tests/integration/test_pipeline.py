"""The real pipeline, end to end: one aggregator process and six worker processes over RabbitMQ
and Redis, three rounds; every device's final mask must equal the simulator's, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from ops.fleet.workers import with_vhost
from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.sim.fedmask import run_fedmask

TASK, WIDTH, SEED, ROUNDS, N = "digits", 32, 0, 3, 6
pytestmark = pytest.mark.services


def _log(path: Path) -> IO[str]:
    """A log file handed to a child process; it stays open for the child's lifetime."""
    return path.open("w")


@pytest.fixture()
def pipeline(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    from aggregator.store import RoundStore
    from ops.control.enrolment import Management

    vhost = f"fedmask-test-{uuid.uuid4().hex[:8]}"
    mgmt = Management()
    try:
        mgmt.ensure_vhost(vhost)
    except Exception as exc:  # the management API is the enrolment path: under CI it must be there
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"RabbitMQ management API unavailable: {exc}", pytrace=False)
        pytest.skip(f"RabbitMQ management API unavailable: {exc}")
    admin_url = with_vhost(amqp_service_url, vhost)
    store = RoundStore.from_url(redis_service_url)
    for key in store.client.scan_iter(match=b"fm:*"):  # only the service prefix: other tests use their own
        store.client.delete(key)
    data = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    ids = [d.device_id for d in data.devices[:N]]
    creds = {d: mgmt.enroll(d, vhost=vhost).amqp_url for d in ids}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fedmask = [sys.executable, "-m", "ops.cli"]
    procs = [subprocess.Popen([*fedmask, "aggregator", "run", "--amqp-url", admin_url, "--redis-url",
                               redis_service_url, "--task", TASK, "--width", str(WIDTH), "--merge", "head"],
                              env=env, stdout=_log(tmp_path / "aggregator.log"), stderr=subprocess.STDOUT)]
    time.sleep(2)  # topology declared before workers publish
    for d in ids:
        procs.append(subprocess.Popen(
            [*fedmask, "worker", "--device-id", d, "--task", TASK, "--width", str(WIDTH), "--amqp-url", creds[d],
             "--state-dir", str(tmp_path / "state")],
            env=env, stdout=_log(tmp_path / f"{d}.log"), stderr=subprocess.STDOUT))
    try:
        yield {"admin_url": admin_url, "store": store, "ids": ids, "data": data, "tmp": tmp_path}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for d in ids:
            mgmt.delete_device(d, vhost=vhost)
        mgmt.delete_vhost(vhost)


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _state(store: object, r: int) -> str:
    info = store.info(r)  # type: ignore[attr-defined]
    return str(info.state) if info is not None else "missing"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=300)


def test_pipeline_matches_simulator(pipeline: dict[str, object], redis_service_url: str) -> None:
    import json

    from aggregator.store import RoundStore

    store: RoundStore = pipeline["store"]  # type: ignore[assignment]
    ids: list[str] = pipeline["ids"]  # type: ignore[assignment]
    data: FederatedDataset = pipeline["data"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]
    _wait(lambda: sorted(store.device_ids()) == sorted(ids), 120, "every worker's hello")
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    # The operator's command drives the rounds; task and width come from the running aggregator.
    urls = ["--amqp-url", str(pipeline["admin_url"]), "--redis-url", redis_service_url]
    run = _cli("round", "run", "--rounds", str(ROUNDS), "--quorum", "1.0", "--deadline", "120", "--json", *urls)
    assert run.returncode == 0, run.stderr
    summaries = [json.loads(line) for line in run.stdout.splitlines()]
    assert [x["round"] for x in summaries] == [1, 2, 3]
    assert all(x["state"] == "closed" and x["received"] == x["sampled"] == N for x in summaries)
    assert all(0 <= x["close_latency_s"] < 5 for x in summaries)
    status = _cli("round", "status", "--json", "--redis-url", redis_service_url)
    assert status.returncode == 0, status.stderr
    devices = json.loads(status.stdout)["devices"]
    assert sorted(d["device"] for d in devices) == sorted(ids) and {d["state"] for d in devices} == {"received"}
    assert all(d["seconds"] > 0 for d in devices)
    watch = _cli("round", "watch", "--once", "--redis-url", redis_service_url)
    assert watch.returncode == 0 and f"round {ROUNDS}  closed" in watch.stdout and ids[0] in watch.stdout
    wrong = _cli("round", "start", "--task", "mnist", *urls)  # not the model the aggregator serves
    assert wrong.returncode != 0 and "serves digits" in wrong.stderr
    _wait(lambda: all(store.mask_version(d) == ROUNDS for d in ids), 30, "masks stored")
    time.sleep(2)  # workers persist the last mask they received

    # The simulator on the same six devices, all sampled every round, same seeds.
    subset = FederatedDataset(data.task, [d for d in data.devices if d.device_id in ids], data.num_classes,
                              data.input_shape, data.vocab_size)
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=preset(TASK).local_epochs)
    run_fedmask(subset, spec, cfg, rounds=ROUNDS, sample_rate=1.0, seed=SEED, merge="head", save_dir=tmp / "sim")
    for d in ids:
        worker = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        worker.load(tmp / "state" / f"{d}.npz")
        sim = DeviceRuntime(d, spec, cfg, (np.zeros(0), np.zeros(0)), seed=SEED)
        sim.load(tmp / "sim" / f"{d}.npz")
        assert worker.mask_version == ROUNDS
        assert np.array_equal(worker.model.mask_bits(), sim.model.mask_bits()), f"{d}: pipeline != simulator"
        assert np.array_equal(worker.structure, sim.structure)
