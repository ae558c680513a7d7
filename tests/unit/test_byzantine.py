"""The simulator's Byzantine boards (shared/sim/byzantine.py): what they send, who they are, and that
the `local` rule (fedmask-local) is immune by construction while the head vote is not."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.bits import unpack
from shared.data import load_task
from shared.device import FedMaskConfig
from shared.models import ModelSpec
from shared.presets import preset
from shared.sim.byzantine import ATTACKS, Adversary, honest_mean, pick_byzantine
from shared.sim.fedmask import run_fedmask

TRAINED = np.array([True, False, True, True, False, False, True, False, True, True, False])  # 11 bits: padding


def _update(device: str = "d1") -> codec.Message:
    return codec.make_update(device=device, round=4, model="a" * 32, layout="b" * 32, bits=TRAINED, version=3,
                             stats=codec.Stats(samples=5, loss=0.1, accuracy=0.5))


@pytest.mark.parametrize(("attack", "expected"), [("zeros", np.zeros(11, bool)), ("ones", np.ones(11, bool)),
                                                  ("invert", ~TRAINED)])
def test_poisoned_update_keeps_the_header_and_the_bit_count(attack: str, expected: np.ndarray) -> None:
    msg = Adversary(frozenset({"d1"}), attack).poison(_update())
    back = codec.decode(codec.encode(msg), expect_type="update")  # the codec's checks: CRC, zero padding
    assert (back.device, back.round, back.version, back.nbits, back.enc) == ("d1", 4, 3, 11, "structure")
    assert np.array_equal(unpack(np.frombuffer(back.bits or b"", np.uint8), 11), expected)


def test_honest_devices_pass_untouched() -> None:
    honest = _update("d2")
    assert Adversary(frozenset({"d1"}), "zeros").poison(honest) is honest
    with pytest.raises(ValueError, match="unknown attack"):
        Adversary(frozenset({"d1"}), "random")


def test_byzantine_boards_are_drawn_from_the_seed() -> None:
    ids = [f"d{i:03d}" for i in range(100)]
    bad = pick_byzantine(ids, 0.1, seed=3)
    assert len(bad) == 10 and bad == pick_byzantine(reversed(ids), 0.1, seed=3) != pick_byzantine(ids, 0.1, seed=4)
    assert len(pick_byzantine(ids[:10], 0.1, seed=0)) == 1 and len(pick_byzantine(ids[:5], 0.1, seed=0)) == 1
    assert honest_mean({"a": 1.0, "b": 0.5, "c": 0.0}, {"c"}) == 0.75


def _run(merge: str, attack: str | None) -> dict[str, float]:
    data = load_task("digits", num_devices=6, seed=0)
    spec = ModelSpec("mlp", data.input_shape, data.num_classes, width=16)
    cfg = FedMaskConfig(train=preset("digits").mask_train, local_epochs=1)
    adversary = None if attack is None else Adversary(pick_byzantine([d.device_id for d in data.devices], 0.2, 0),
                                                      attack)
    r = run_fedmask(data, spec, cfg, rounds=2, sample_rate=1.0, seed=0, merge=merge, adversary=adversary)
    if adversary is not None:
        assert r.extra["byzantine"] == sorted(adversary.devices) and r.extra["attack"] == attack
        return {d: a for d, a in r.per_device_accuracy.items() if d not in adversary.devices}
    return r.per_device_accuracy


def test_local_is_immune_and_a_vote_is_not() -> None:
    clean_local = _run("local", None)
    for attack in ATTACKS:
        attacked = _run("local", attack)
        assert attacked == {d: clean_local[d] for d in attacked}  # nothing merged: the same models
    clean_paper = _run("paper", None)
    steered = _run("paper", "invert")  # every element voted: the liar's votes reach every device
    assert steered != {d: clean_paper[d] for d in steered}
