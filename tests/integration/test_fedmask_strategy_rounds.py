"""FedMask as a pipeline strategy (StrategyRoundsCore with `--strategy fedmask`) on real Redis with an
in-memory downlink: a board's hello carries its pruned structure, which the server half checks
(check_hello's rules) and RoundStore keeps per device, not in the half's state; a restarted board
repeats the same hello; the round's downlinks equal the simulator's server half fed the same hellos."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.core_strategy_rounds import StrategyRoundsCore
from aggregator.store import RoundStore
from shared.amqp import AmqpSettings
from shared.data import FederatedDataset, load_task
from shared.payloads import Part
from shared.strategies import get_strategy
from shared.strategies.fedmask import FedMaskDevice
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import config_fields, strategy_setup
from shared.transport import InMemoryTransport
from worker.strategy_board import StrategyBoard
from worker.strategy_runtime import StrategyWorker

NAME, TASK, SEED = "fedmask", "digits", 0


@pytest.fixture(scope="module")
def fleet() -> FederatedDataset:
    return load_task(TASK, num_devices=3, seed=SEED)


def _core(store: RoundStore) -> tuple[StrategyRoundsCore, InMemoryTransport]:
    downlink = InMemoryTransport()
    core = StrategyRoundsCore(store, downlink, strategy_setup(TASK, NAME, width=16, rounds=3), seed=SEED)
    store.set_config(dict(config_fields(NAME, core.setup.cfg)))
    return core, downlink


def _worker(core: StrategyRoundsCore, fleet: FederatedDataset, i: int) -> StrategyWorker:
    d = fleet.devices[i]
    return StrategyWorker(d.device_id, core.store.config(), core.setup.spec, (d.train.x, d.train.y), SEED)


def _board_hello(core: StrategyRoundsCore, worker: StrategyWorker) -> StrategyMessage:
    """What worker/strategy_board.StrategyBoard.hello sends: the half's hello with the settings digest."""
    own = worker.half.hello()
    assert own is not None
    return replace(own, model=core.fingerprint)


def _send(core: StrategyRoundsCore, msg: StrategyMessage) -> str:
    decision = core.handle(f"device.{msg.device}.{msg.type}", msg.device, encode_strategy(msg))
    return decision.reason if decision.action == "reject" else "ack"


def _with_structure(msg: StrategyMessage, values: bytes) -> StrategyMessage:
    part = msg.part("structure")
    return replace(msg, parts=(Part(name="structure", enc="bits", n=part.n, values=values),))


def test_a_structure_hello_is_checked_and_kept_per_device(store: RoundStore, fleet: FederatedDataset) -> None:
    core, _ = _core(store)
    a, b = _worker(core, fleet, 0), _worker(core, fleet, 1)
    hello_a, hello_b = _board_hello(core, a), _board_hello(core, b)
    assert hello_a.part("structure").values != hello_b.part("structure").values  # each board prunes its own
    assert _send(core, replace(hello_a, model="ab" * 16)) == "wrong_model"  # another settings digest
    nothing = bytes(len(hello_a.part("structure").values))  # an empty structure: no pruning makes it
    assert _send(core, _with_structure(hello_a, nothing)) == "bad_structure"
    short = replace(hello_a, parts=(Part(name="structure", enc="bits", n=8, values=b"\xff"),))
    assert _send(core, short) == "bad_length"
    assert _send(core, replace(hello_a, parts=())) == "missing_field"  # a fedmask hello must carry its structure
    assert store.device_ids() == []
    assert _send(core, hello_a) == "ack"
    assert _send(core, hello_a) == "ack"  # a restarted board's re-hello: the same structure
    assert store.structure(a.half.device_id) == hello_a.part("structure").values
    # A board cannot move its votes later: another structure (b's, one pruning can make) is refused.
    assert _send(core, _with_structure(hello_a, hello_b.part("structure").values)) == "structure_changed"
    assert store.structure(a.half.device_id) == hello_a.part("structure").values
    # The structures live with the devices, not in the half's state (every enrol would rewrite it).
    raw = core.strategy.state.raw()
    assert raw is not None and "records" not in json.loads(raw)["fields"]


def test_a_restarted_board_says_the_same_hello(store: RoundStore, fleet: FederatedDataset, tmp_path: Path) -> None:
    """StrategyBoard.hello (what `fedmask worker --strategy fedmask` sends) saves the pruned state at
    once; a board restarted from that state file repeats the hello byte for byte without pruning again."""
    core, _ = _core(store)
    d = fleet.devices[0]

    def board() -> StrategyBoard:
        return StrategyBoard(d.device_id, core.setup, (d.train.x, d.train.y), amqp=AmqpSettings(),
                             state_dir=tmp_path, seed=SEED)
    first = board()
    body = first.hello()
    msg = decode_strategy(body)
    assert msg.model == core.fingerprint and msg.part("structure").n == first.worker.half.model.nbits
    assert _send(core, msg) == "ack"
    again = board()
    half = again.worker.half
    assert isinstance(half, FedMaskDevice) and half.runtime.structure is None  # not pruned yet
    again.worker.load(again.state_path)  # what enrol() does on a restart: the structure comes back
    assert half.runtime.structure is not None and half.runtime.structure.tobytes() == msg.part("structure").values
    assert again.hello() == body
    mine, theirs = again.worker.half.model.state_dict(), first.worker.half.model.state_dict()
    assert all(np.array_equal(mine[k].numpy(), theirs[k].numpy()) for k in mine)
    assert _send(core, decode_strategy(again.hello())) == "ack"


def test_a_round_folds_as_the_simulators_server(store: RoundStore, fleet: FederatedDataset) -> None:
    core, downlink = _core(store)
    workers = [_worker(core, fleet, i) for i in range(3)]
    setup = core.setup
    reference = get_strategy(NAME).server(setup.spec, setup.cfg, seed=SEED, rounds=setup.rounds)
    for w in workers:
        hello = _board_hello(core, w)
        assert _send(core, hello) == "ack"
        reference.enrol(replace(hello, model=reference.hello_model()))
    core.start_round(rate=1.0, quorum=1.0, deadline_s=600)
    updates = {}
    for w in workers:
        body = w.handle(downlink.take_downlink(w.half.device_id)[0])
        assert body is not None
        updates[w.half.device_id] = decode_strategy(body)
    bad = replace(updates[workers[0].half.device_id],
                  parts=(Part(name="mask", enc="bits", n=8, values=b"\x01"),))
    assert _send(core, bad) == "bad_length"  # the dry fold at ingest checks it against the stored structure
    for msg in updates.values():
        assert _send(core, msg) == "ack"  # the last one closes the round (quorum reached)
    expected = {d: encode_strategy(m) for d, m in reference.fold(1, updates).items()}
    assert sorted(expected) == sorted(updates)
    got = {d: downlink.take_downlink(d) for d in expected}
    assert got == {d: [body] for d, body in expected.items()}  # every participant's merged mask
