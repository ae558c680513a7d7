"""StrategyRoundsCore (the service's `--strategy` core) on real Redis with an in-memory downlink:
every untrusted message a board can send is refused with its own reason and stores nothing, and a
close cut short at any step folds a round exactly once."""

from __future__ import annotations

import time

import pytest

from aggregator.core_strategy_rounds import StrategyRoundsCore
from aggregator.store import RoundStore
from shared.data import FederatedDataset, load_task
from shared.payloads import bits_part
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import config_fields, strategy_setup
from shared.transport import InMemoryTransport
from worker.strategy_runtime import StrategyWorker

NAME, TASK = "lg-fedavg", "digits"


@pytest.fixture(scope="module")
def fleet() -> FederatedDataset:
    return load_task(TASK, num_devices=3, seed=0)


def _hello(core: StrategyRoundsCore, device: str, **changes: object) -> StrategyMessage:
    fields: dict[str, object] = {"type": "shello", "strategy": NAME, "device": device, "round": 0,
                                 "model": core.fingerprint, **changes}
    return StrategyMessage(**fields)  # type: ignore[arg-type]


def _send(core: StrategyRoundsCore, msg: StrategyMessage, *, user: str | None = None, kind: str | None = None) -> str:
    decision = core.handle(f"device.{msg.device}.{kind or msg.type}", user if user is not None else msg.device,
                           encode_strategy(msg))
    return decision.reason if decision.action == "reject" else "ack"


def _workers(core: StrategyRoundsCore, fleet: FederatedDataset) -> dict[str, StrategyWorker]:
    return {d.device_id: StrategyWorker(d.device_id, core.store.config(), core.setup.spec, (d.train.x, d.train.y), 0)
            for d in fleet.devices}


def _core(store: RoundStore, downlink: InMemoryTransport) -> StrategyRoundsCore:
    core = StrategyRoundsCore(store, downlink, strategy_setup(TASK, NAME, width=16, rounds=3))
    store.set_config(dict(config_fields(NAME, core.setup.cfg)))  # what a board's StrategyWorker is built from
    return core


def test_every_untrusted_message_is_refused_with_a_reason(store: RoundStore, fleet: FederatedDataset) -> None:
    downlink = InMemoryTransport()
    core = _core(store, downlink)
    a, b, c = (d.device_id for d in fleet.devices)
    assert _send(core, _hello(core, a), user=b) == "spoofed_device"
    assert _send(core, _hello(core, a), kind="supdate") == "routing_mismatch"
    assert _send(core, _hello(core, a, strategy="feddst")) == "wrong_strategy"
    assert _send(core, _hello(core, a, model="ab" * 16)) == "wrong_model"  # other settings than the server's
    # A payload in a hello is an enrolling strategy's (FedMask's structure); lg-fedavg takes none.
    assert _send(core, _hello(core, a, parts=(bits_part("structure", [True] * 9),))) == "forbidden_field"
    assert core.handle(f"device.{a}.shello", a, b"\xc1not msgpack").reason == "undecodable"
    assert store.device_ids() == []
    for d in (a, b):
        assert _send(core, _hello(core, d)) == "ack"
    core.start_round(rate=1.0, quorum=1.0, deadline_s=600)
    workers = _workers(core, fleet)
    task = downlink.take_downlink(a)[0]
    update = decode_strategy(workers[a].handle(task) or b"")
    outsider = StrategyMessage(type="supdate", strategy=NAME, device=c, round=1, model=update.model,
                               parts=update.parts, stats=update.stats)
    assert _send(core, outsider) == "not_enrolled"  # an update before its hello
    assert _send(core, StrategyMessage(type="stask", strategy=NAME, device=a, round=1, model=update.model)) == \
        "wrong_type"
    assert store.updates(1) == {}
    assert _send(core, update) == "ack"
    assert _send(core, update) == "ack"  # a redelivery: stored once (SET NX)
    assert list(store.updates(1)) == [a]
    rejected = {k: int(v) for k, v in store.counters().items() if k.startswith("rejected:")}
    assert rejected == {f"rejected:{r}": 1 for r in ("spoofed_device", "routing_mismatch", "wrong_strategy",
                                                      "wrong_model", "forbidden_field", "undecodable", "not_enrolled",
                                                      "wrong_type")}
    with pytest.raises(Exception, match="late drop"):
        core.start_round(rate=1.0, late="carry")


def test_a_close_cut_short_folds_the_round_exactly_once(store: RoundStore, fleet: FederatedDataset) -> None:
    downlink = InMemoryTransport()
    core = _core(store, downlink)
    for d in fleet.devices:
        assert _send(core, _hello(core, d.device_id)) == "ack"
    core.start_round(rate=1.0, quorum=1.0, deadline_s=600)
    workers = _workers(core, fleet)
    bodies = {d: workers[d].handle(downlink.take_downlink(d)[0]) or b"" for d in workers}
    late = fleet.devices[-1].device_id  # its update arrives after the close
    for d, body in bodies.items():  # stored, but the close is called below, to cut it short
        if d != late:
            assert core.strategy.ingest(body, time.time()).status == "stored"

    assert store.try_close(1, time.time() + 601)  # past its deadline: this process is elected closer

    def crash(_downlinks: dict[str, bytes]) -> None:  # killed after the fold, before the commit
        raise RuntimeError("killed mid-publish")
    version = core.strategy.version()
    with pytest.raises(RuntimeError):
        core.strategy.close(1, time.time(), publish=crash)
    assert core.strategy.version() == version  # nothing committed
    closed: list[int] = []
    first = core.strategy.close(1, time.time(), on_closed=lambda: closed.append(1))  # the resumed close
    assert first == {} and core.strategy.version() != version  # lg-fedavg's next tasks carry the new head
    after = core.strategy.version()
    # A second resume only marks the round closed (already closed: it is not counted again).
    assert core.strategy.close(1, time.time(), on_closed=lambda: closed.append(2)) == {}
    assert core.strategy.version() == after and closed == [1]
    info = store.info(1)
    assert info is not None and info.state == "closed"
    # The late update of a closed round is refused and counted, not folded into the next round.
    assert _send(core, decode_strategy(bodies[late])) == "round_closed"
    assert _send(core, decode_strategy(bodies[fleet.devices[0].device_id])) == "ack"  # a redelivery: a duplicate
    assert int(store.counters().get("late:dropped", 0)) == 1
