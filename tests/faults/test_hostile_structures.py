"""Hellos with structures one-shot pruning cannot produce, against the real aggregator service.

The deployment is test_hostile_inputs.py's (a throwaway vhost, one broker user per device, the
AggregatorService in a thread on its own Redis prefix). Enrolled boards announce structures that
claim too much or too little (the issue's stolen board claimed every parameter, to vote on every
element of every device); each must be dead-lettered once with reason bad_structure, counted, and
leave no structure in Redis, so the board can vote nowhere. A board's valid hello still counts
afterwards, and a valid but changed structure stays refused (structure_changed).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from shared import codec
from shared.amqp import DEAD_QUEUE, Publisher, queue_depth
from shared.bits import pack, unpack
from shared.models import build_model
from shared.presets import model_spec
from shared.structures import random_structure, structure_rule
from tests.faults.test_hostile_inputs import (  # noqa: F401  (deployment: the fixture)
    SEED,
    TASK,
    WIDTH,
    Deployment,
    deployment,
    poll,
    take_dead_letters,
)


def test_impossible_structures_are_refused_and_never_stored(deployment: Deployment) -> None:  # noqa: F811
    dep, store, dev = deployment, deployment.store, deployment.devices
    net = build_model(model_spec(TASK, width=WIDTH, seed=SEED))
    rule = structure_rule(net, last_k=2, rho=0.2)
    first_pruned = rule.pruned[0].spans[0][0]  # the flat index where the pruned layers begin
    real = {role: d.runtime.hello() for role, d in dev.items()}  # prunes: the structures pruning gives
    alice_bits = unpack(np.frombuffer(real["alice"].bits or b"", np.uint8), rule.nbits)

    def claimed(role: str, change: str) -> np.ndarray:
        bits = unpack(np.frombuffer(real[role].bits or b"", np.uint8), rule.nbits).copy()
        pruned = np.arange(rule.nbits) >= first_pruned
        if change == "everything":
            bits[:] = True
        elif change == "one more":
            bits[int(np.flatnonzero(pruned & ~bits)[0])] = True
        elif change == "one fewer":
            bits[int(np.flatnonzero(pruned & bits)[0])] = False
        elif change == "unpruned bit missing":
            bits[7] = False
        return bits

    cases = {  # role -> (the structure it claims, the expected reason)
        "bob": (claimed("bob", "everything"), "bad_structure"),
        "carol": (claimed("carol", "one more"), "bad_structure"),
        "dave": (claimed("dave", "one fewer"), "bad_structure"),
        "laggard": (claimed("laggard", "unpruned bit missing"), "bad_structure"),
    }
    assert int(cases["bob"][0].sum()) == rule.nbits

    with Publisher(dev["alice"].amqp) as alice_link:
        alice_link.publish_uplink(dev["alice"].id, "hello", codec.encode(real["alice"]))
        dep.wait_for(lambda: store.structure(dev["alice"].id) is not None, 20, "alice's honest hello")
        sent: dict[tuple[str, bytes], str] = {}
        for role, (bits, reason) in cases.items():
            body = codec.encode(codec.make_hello(device=dev[role].id, round=0, model=net.fingerprint(),
                                                 layout=net.layout_hash(), structure=bits))
            with Publisher(dev[role].amqp) as link:
                link.publish_uplink(dev[role].id, "hello", body)
            sent[(f"device.{dev[role].id}.hello", body)] = reason
        # Alice again, with a structure pruning could give (valid) but not hers: her first one stands.
        other = unpack(random_structure(rule, np.random.default_rng(1)), rule.nbits)
        assert not np.array_equal(other, alice_bits)
        changed = codec.encode(codec.make_hello(device=dev["alice"].id, round=0, model=net.fingerprint(),
                                                layout=net.layout_hash(), structure=other))
        alice_link.publish_uplink(dev["alice"].id, "hello", changed)
        sent[(f"device.{dev['alice'].id}.hello", changed)] = "structure_changed"

        assert poll(lambda: queue_depth(dep.admin, DEAD_QUEUE) >= len(sent), 20), "not every hello was refused"
        letters = take_dead_letters(dep.admin)
        got = {(x.routing_key, x.body): x.reason for x in letters}
        assert len(letters) == len(sent) and got == sent

        counters = store.counters()
        assert counters.get("rejected:bad_structure") == 4 and counters.get("rejected:structure_changed") == 1
        for role in cases:
            assert store.structure(dev[role].id) is None, f"{role}'s refused structure was stored"
        assert store.structure(dev["alice"].id) == pack(alice_bits).tobytes()

        # Refused is not banned: bob's own pruned structure is taken afterwards.
        with Publisher(dev["bob"].amqp) as link:
            link.publish_uplink(dev["bob"].id, "hello", codec.encode(real["bob"]))
        dep.wait_for(lambda: store.structure(dev["bob"].id) is not None, 20, "bob's honest hello")
        assert store.structure(dev["bob"].id) == real["bob"].bits
    assert dep.thread.is_alive() and not dep.crashes
    assert Counter(got.values()) == Counter({"bad_structure": 4, "structure_changed": 1})
