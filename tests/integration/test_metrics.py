"""The aggregator's metrics on real Redis: the counters a scrape shows move when the core stores,
refuses, drops and closes (in-memory downlink), and per-round statistics reach `round history`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import AggregatorMetrics, MeteredCore
from aggregator.round_stats import history, round_stats
from aggregator.store import RoundStore
from shared import codec
from shared.data import FederatedDataset
from shared.device import DeviceRuntime
from shared.presets import model_spec
from shared.transport import InMemoryTransport
from tests.integration.test_aggregator_core import SEED, TASK, WIDTH, _cfg, _hello_all, _train_round, data

pytestmark = pytest.mark.services
__all__ = ["data"]  # a fixture, re-exported so pytest finds it here (store: conftest.py)


def scrape(metrics: AggregatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value, parsed back from the exposition text."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_counters_move_as_the_core_accepts_and_rejects(store: RoundStore, data: FederatedDataset) -> None:
    bus = InMemoryTransport()
    core = MeteredCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
    metrics = core.metrics = AggregatorMetrics(store)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    devs = {d.device_id: DeviceRuntime(d.device_id, spec, _cfg(), (d.train.x, d.train.y), SEED,
                                       val_xy=(d.val.x, d.val.y)) for d in data.devices}
    before = scrape(metrics)
    assert before[("fedmask_redis_up", ())] == 1
    assert before[("fedmask_updates_stored_total", ())] == 0 and before[("fedmask_round_current", ())] == 0
    assert before[("fedmask_late_updates_total", (("outcome", "dropped"),))] == 0
    _hello_all(core, devs)
    assert scrape(metrics)[("fedmask_devices_enrolled", ())] == len(devs)

    core.start_round(rate=1.0, quorum=0.5, deadline_s=60, seed=SEED)  # quorum 2 of 4
    bodies = _train_round(core, bus, devs)
    a, b, c, _ = sorted(bodies)
    live = scrape(metrics)
    assert live[("fedmask_round_state", (("state", "open"),))] == 1 and live[("fedmask_round_current", ())] == 1
    assert live[("fedmask_round_devices", (("set", "sampled"),))] == 4
    for device, body in ((a, b"\xc1garbage"), (a, bodies[a]), (a, bodies[a]), (b, bodies[b]), (c, bodies[c])):
        metrics.received(f"device.{device}.update")  # what the service does once per delivery
        core.handle(f"device.{device}.update", device, body)
    after = scrape(metrics)
    assert after[("fedmask_updates_received_total", ())] == 5
    assert after[("fedmask_updates_stored_total", ())] == 2
    assert after[("fedmask_updates_duplicate_total", ())] == 1
    assert after[("fedmask_updates_rejected_total", (("reason", "undecodable"),))] == 1
    assert after[("fedmask_updates_rejected_total", (("reason", "round_closed"),))] == 1  # c came after the close
    assert after[("fedmask_late_updates_total", (("outcome", "dropped"),))] == 1
    assert after[("fedmask_rounds_closed_total", ())] == 1
    assert after[("fedmask_round_state", (("state", "closed"),))] == 1
    assert after[("fedmask_round_state", (("state", "open"),))] == 0
    assert after[("fedmask_round_close_seconds_count", ())] == 1
    assert after[("fedmask_round_close_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("fedmask_devices_alive", ())] == 4 and after[("fedmask_devices_unreachable", ())] == 0

    # What the devices reported: per device in the round's stats, their mean in history and the gauges.
    stats = round_stats(store, 1)
    assert sorted(stats) == [a, b]
    for d in (a, b):
        sent = codec.decode(bodies[d]).stats
        assert sent is not None and sent.val_accuracy is not None
        assert stats[d]["loss"] == sent.loss and stats[d]["val_accuracy"] == sent.val_accuracy
        assert 0 <= stats[d]["val_accuracy"] <= 1 and stats[d]["samples"] == sent.samples
    (row,) = history(store)
    assert (row["round"], row["state"], row["sampled"], row["received"], row["merged"], row["late"]) == \
        (1, "closed", 4, 2, 2, 1)
    assert row["mean_val_accuracy"] == pytest.approx(np.mean([stats[d]["val_accuracy"] for d in (a, b)]))
    assert row["mean_train_loss"] == pytest.approx(np.mean([stats[d]["loss"] for d in (a, b)]))
    assert row["close_latency_s"] is not None and row["close_latency_s"] >= 0
    assert after[("fedmask_round_mean_val_accuracy", ())] == pytest.approx(row["mean_val_accuracy"])
    json.dumps(row)  # a history row is plain JSON


def test_a_scrape_survives_redis_going_away(store: RoundStore) -> None:
    broken = RoundStore.from_url("redis://127.0.0.1:1/0", prefix=store.prefix)  # nothing listens on port 1
    values = scrape(AggregatorMetrics(broken))
    assert values[("fedmask_redis_up", ())] == 0
    assert ("fedmask_updates_stored_total", ()) not in values
    assert values[("fedmask_updates_received_total", ())] == 0  # this process's own metrics are still served
