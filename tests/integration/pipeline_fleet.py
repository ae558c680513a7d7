"""The real pipeline as the pipeline tests start it: one `fedmask aggregator run` and N `fedmask worker`
processes over RabbitMQ (a fresh vhost, each device enrolled with its own broker user) and Redis (the
service's fm: keys flushed first). Shared by test_pipeline.py and test_pipeline_agreement.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pytest

from ops.fleet.workers import with_vhost
from shared.data import FederatedDataset, load_task
from shared.presets import preset

TASK, WIDTH, SEED, ROUNDS, N = "digits", 32, 0, 3, 6


def _log(path: Path) -> IO[str]:
    """A log file handed to a child process; it stays open for the child's lifetime."""
    return path.open("w")


@contextlib.contextmanager
def start_pipeline(amqp_service_url: str, redis_service_url: str, tmp_path: Path, *,
                   aggregator_args: list[str], worker_args: list[str], first: int = 0,
                   slow: int = 0, n: int = N) -> Iterator[dict[str, Any]]:
    """Start the processes (TASK, WIDTH, `n` devices from the `first`; the extra flags on each command
    line; the last `slow` workers emulate a Pi 4),
    yield what the test needs, and stop everything, vhost and device users included. Broker users
    are global: tests that may run at the same time on one broker take different `first`."""
    from aggregator.store import RoundStore
    from ops.control.enrolment import Management

    vhost = f"fedmask-test-{uuid.uuid4().hex[:8]}"
    broker = urlparse(amqp_service_url)
    # The management API of the broker under test (as tests/integration/test_amqp.py finds it):
    # FEDMASK_TEST_MANAGEMENT_URL when it is not on the broker's host at 15672 (e.g. a private node).
    mgmt = Management(os.environ.get("FEDMASK_TEST_MANAGEMENT_URL", f"http://{broker.hostname or '127.0.0.1'}:15672"))
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
    ids = [d.device_id for d in data.devices[first:first + n]]
    if len(ids) != n:  # an empty fleet would pass "every worker's hello" with no worker started
        raise ValueError(f"{TASK} has {len(data.devices)} devices: no {n} from device {first}")
    # The devices' URLs name the broker under test, not 127.0.0.1:5672 (a container's port differs).
    creds = {d: mgmt.enroll(d, vhost=vhost, amqp_host=broker.hostname or "127.0.0.1",
                            amqp_port=broker.port or 5672).amqp_url for d in ids}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fedmask = [sys.executable, "-m", "ops.cli"]
    aggregator = [*fedmask, "aggregator", "run", "--amqp-url", admin_url, "--redis-url", redis_service_url,
                  "--task", TASK, "--width", str(WIDTH), "--ack-durability", "unchecked",  # the machine's Redis
                  *aggregator_args]
    procs = [subprocess.Popen(aggregator, env=env, stdout=_log(tmp_path / "aggregator.log"), stderr=subprocess.STDOUT)]
    time.sleep(2)  # topology declared before workers publish
    for i, d in enumerate(ids):
        profile = ["--profile", "pi4"] if i >= len(ids) - slow else []
        procs.append(subprocess.Popen(
            [*fedmask, "worker", "--device-id", d, "--task", TASK, "--width", str(WIDTH), "--amqp-url", creds[d],
             "--state-dir", str(tmp_path / "state"), *worker_args, *profile],
            env=env, stdout=_log(tmp_path / f"{d}.log"), stderr=subprocess.STDOUT))
    try:
        # procs: the aggregator first, then the workers in `ids` order (a test may stop one early, or
        # append a process it started, e.g. a restarted aggregator from `aggregator_cmd`: it is stopped too).
        yield {"admin_url": admin_url, "store": store, "ids": ids, "data": data, "tmp": tmp_path, "procs": procs,
               "aggregator_cmd": aggregator}
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


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=300)


def subset(data: FederatedDataset, ids: list[str]) -> FederatedDataset:
    """The simulator's federation: the pipeline's devices only."""
    return FederatedDataset(data.task, [d for d in data.devices if d.device_id in ids], data.num_classes,
                            data.input_shape, data.vocab_size)
