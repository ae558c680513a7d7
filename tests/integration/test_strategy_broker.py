"""Every weight-training strategy through the real pipeline (issue 12, item 5): `fedmask aggregator run
--strategy S`, three `fedmask worker --strategy S` processes over RabbitMQ (each with its own broker
user) and Redis, three rounds driven by `fedmask round run`. The outcome must equal the simulator's
(`run_strategy` on the same three devices, all sampled every round) bit for bit: every device's
final model, the per-device test accuracies, and the uplink and downlink bytes, counted here from
what the workers logged of the encoded messages they sent and received (tests/integration/
strategy_reference.py). fedmask (FedMask itself as a strategy: each board's hello carries its pruned
structure, counted in the uplink bytes as the simulator counts it) runs in make test too (32 s here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.strategy_setup import PIPELINE_STRATEGIES
from tests.integration.pipeline_fleet import start_pipeline
from tests.integration.strategy_reference import BOARDS, ROUNDS, assert_pipeline_equals_simulator

pytestmark = pytest.mark.services
FIRST = 12  # device ids no other pipeline test enrols (broker users are global)


@pytest.fixture(params=[pytest.param(s, marks=[] if s in ("fedavg", "feddst", "fedmask") else pytest.mark.exhaustive)
                        for s in PIPELINE_STRATEGIES])
def pipeline(request: pytest.FixtureRequest, amqp_service_url: str, redis_service_url: str,
             tmp_path: Path) -> Iterator[dict[str, Any]]:
    flags = ["--strategy", request.param]
    with start_pipeline(amqp_service_url, redis_service_url, tmp_path, first=FIRST, n=BOARDS,
                        aggregator_args=[*flags, "--planned-rounds", str(ROUNDS)], worker_args=flags) as p:
        yield {**p, "strategy": request.param}


def test_strategy_pipeline_equals_the_simulator(pipeline: dict[str, Any], redis_service_url: str) -> None:
    assert_pipeline_equals_simulator(pipeline, redis_service_url)
