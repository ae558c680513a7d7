"""Structures a hello may claim (shared/structures.py): hand-made bad ones are refused with
bad_structure, the real pruning code's output is accepted, and the simulator's intake
(shared.rounds.receive_hello) applies the same checks, a changed structure included."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.bits import pack, unpack
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import CodecError
from shared.models import MaskedNet, ModelSpec, build_model
from shared.presets import model_spec, preset
from shared.pruning import kept_count
from shared.rounds import DeviceRecord, receive_hello
from shared.structures import StructureRule, check_structure, random_structure, structure_rule
from shared.transport import Envelope

SPEC = model_spec("digits", width=8, seed=0)  # mlp 64 -> 8 -> 8 -> 10: layers of 512, 64 and 80 elements


@pytest.fixture(scope="module")
def net() -> MaskedNet:
    return build_model(SPEC)


@pytest.fixture(scope="module")
def rule(net: MaskedNet) -> StructureRule:
    return structure_rule(net, last_k=2, rho=0.2)


def _bits(rule: StructureRule, seed: int = 0) -> np.ndarray:
    return unpack(random_structure(rule, np.random.default_rng(seed)), rule.nbits)


def _refused(bits: np.ndarray, rule: StructureRule) -> str:
    with pytest.raises(CodecError) as err:
        check_structure(pack(bits), rule)
    assert err.value.reason == "bad_structure"
    return err.value.detail


def test_rule_counts_match_the_pruning_code(rule: StructureRule, net: MaskedNet) -> None:
    assert rule.nbits == net.nbits == 512 + 64 + 80
    assert [(layer.index, layer.kept) for layer in rule.pruned] == [(1, kept_count(64, 0.2)), (2, kept_count(80, 0.2))]
    assert [layer.kept for layer in rule.pruned] == [13, 16]
    assert int(unpack(rule.whole, rule.nbits).sum()) == 512  # the first layer is unpruned


def test_a_valid_structure_is_accepted(rule: StructureRule) -> None:
    bits = _bits(rule)
    assert int(bits.sum()) == 512 + 13 + 16
    check_structure(pack(bits), rule)


def test_one_bit_too_many_in_a_pruned_layer(rule: StructureRule) -> None:
    bits = _bits(rule)
    extra = 512 + int(np.flatnonzero(~bits[512:576])[0])  # an element of layer 1 it does not keep
    bits[extra] = True
    assert "layer 1 holds 14 elements" in _refused(bits, rule)


def test_one_bit_too_few_in_a_pruned_layer(rule: StructureRule) -> None:
    bits = _bits(rule)
    bits[576 + int(np.flatnonzero(bits[576:])[0])] = False
    assert "layer 2 holds 15 elements" in _refused(bits, rule)


def test_a_bit_of_an_unpruned_layer_missing(rule: StructureRule) -> None:
    bits = _bits(rule)
    bits[100] = False
    assert "1 elements of the unpruned layers are missing" in _refused(bits, rule)


def test_every_parameter_claimed(rule: StructureRule) -> None:
    """The issue's stolen board: a structure of all ones would vote on every element."""
    assert "layer 1 holds 64 elements" in _refused(np.ones(rule.nbits, dtype=bool), rule)


def test_a_pruned_layer_moved_into_another(rule: StructureRule) -> None:
    """Right total, wrong layers: 14 in layer 1 and 15 in layer 2 is refused too."""
    bits = _bits(rule)
    bits[576 + int(np.flatnonzero(bits[576:])[0])] = False
    bits[512 + int(np.flatnonzero(~bits[512:576])[0])] = True
    assert int(bits.sum()) == 512 + 13 + 16
    _refused(bits, rule)


def test_a_layer_unpruned_by_config_must_be_whole(net: MaskedNet) -> None:
    """With last_k 1 only the classifier is pruned: a structure thinning layer 1 (valid under last_k 2)
    misses elements of a layer the configuration leaves whole."""
    last_only = structure_rule(net, last_k=1, rho=0.2)
    assert [layer.index for layer in last_only.pruned] == [2]
    bits = _bits(structure_rule(net, last_k=2, rho=0.2))
    assert "51 elements of the unpruned layers are missing" in _refused(bits, last_only)
    bits[512:576] = True  # layer 1 whole: now valid for last_k 1
    check_structure(pack(bits), last_only)


def test_rho_one_means_everything(net: MaskedNet) -> None:
    full = structure_rule(net, last_k=2, rho=1.0)
    check_structure(pack(np.ones(net.nbits, dtype=bool)), full)
    bits = np.ones(net.nbits, dtype=bool)
    bits[-1] = False
    _refused(bits, full)


def test_wrong_length_is_bad_structure(rule: StructureRule) -> None:
    with pytest.raises(CodecError, match="bad_structure"):
        check_structure(np.zeros(3, dtype=np.uint8), rule)


@pytest.mark.parametrize(("last_k", "rho"), [(2, 0.2), (1, 0.5)])
def test_the_real_pruning_code_produces_accepted_structures(last_k: int, rho: float) -> None:
    data = load_task("digits", num_devices=4, seed=0)
    spec = ModelSpec("mlp", data.input_shape, data.num_classes, width=16)
    cfg = FedMaskConfig(train=preset("digits").mask_train, prune_last_k=last_k, prune_rho=rho)
    rule = structure_rule(build_model(spec), last_k=last_k, rho=rho)
    for d in data.devices:
        hello = DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), seed=0).hello()
        check_structure(np.frombuffer(hello.bits or b"", np.uint8), rule)


def _hello(net: MaskedNet, bits: np.ndarray, device: str = "d1") -> tuple[Envelope, codec.Message]:
    msg = codec.make_hello(device=device, round=0, model=net.fingerprint(), layout=net.layout_hash(), structure=bits)
    return Envelope(f"device.{device}.hello", device, codec.encode(msg)), msg


def test_simulator_intake_refuses_bad_and_changed_structures(net: MaskedNet, rule: StructureRule) -> None:
    records: dict[str, DeviceRecord] = {}
    kw = {"fingerprint": net.fingerprint(), "layout": net.layout_hash(), "rule": rule, "records": records}
    with pytest.raises(CodecError, match="bad_structure"):
        receive_hello(*_hello(net, np.ones(net.nbits, dtype=bool)), **kw)  # type: ignore[arg-type]
    assert records == {}
    first = _bits(rule, seed=1)
    rec = receive_hello(*_hello(net, first), **kw)  # type: ignore[arg-type]
    assert records == {"d1": rec} and np.array_equal(unpack(rec.structure, net.nbits), first)
    assert receive_hello(*_hello(net, first), **kw) is rec  # type: ignore[arg-type]  # the same again: a no-op
    with pytest.raises(CodecError, match="structure_changed"):  # valid, but another one
        receive_hello(*_hello(net, _bits(rule, seed=2)), **kw)  # type: ignore[arg-type]
    assert np.array_equal(unpack(records["d1"].structure, net.nbits), first)
