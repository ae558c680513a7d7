"""Which structures one-shot pruning can produce, and the check that refuses any other in a hello.

A device's structure S_i decides where it votes. A board that claims more than pruning gives it
(every parameter, say) votes on every element of every device, so the server checks each hello
against what shared/pruning.py can produce for the model and rho it knows:
  - in each pruned layer (the last K, all of that layer's masked tensors together) exactly
    `kept_count(elements, rho)` elements;
  - every element of the unpruned layers;
  - nothing else (the codec has already refused nonzero padding bits).
Which elements a pruned layer keeps depends on the device's data, so it is not checked.

Pure: no broker, no Redis. The simulator (shared.rounds.receive_hello) and the aggregator service
(aggregator/core.py) call the same `check_structure`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.bits import check_packed, pack
from shared.errors import CodecError
from shared.models import MaskedNet
from shared.pruning import kept_count


@dataclass(frozen=True)
class PrunedLayer:
    index: int  # the model's layer index
    spans: tuple[tuple[int, int], ...]  # [start, stop) of each of its masked tensors in the flat vector
    kept: int  # how many of its elements a pruned structure holds


@dataclass(frozen=True)
class StructureRule:
    """What a valid structure of one model under one pruning setting looks like."""

    nbits: int
    whole: np.ndarray  # packed: 1 on every element of the unpruned layers (all must be 1)
    pruned: tuple[PrunedLayer, ...]


def structure_rule(net: MaskedNet, *, last_k: int, rho: float) -> StructureRule:
    """The rule for `net` when one-shot pruning keeps `rho` of each of the last `last_k` layers."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not 1 <= last_k <= net.num_layers:
        raise ValueError(f"last_k must be in 1..{net.num_layers}, got {last_k}")
    first = net.num_layers - last_k
    spans: dict[int, list[tuple[int, int]]] = {}
    offset = 0
    for t in net.masked():
        n = t.weight.numel()
        if t.layer_index >= first:
            spans.setdefault(t.layer_index, []).append((offset, offset + n))
        offset += n
    pruned = tuple(PrunedLayer(i, tuple(s), kept_count(sum(b - a for a, b in s), rho))
                   for i, s in sorted(spans.items()))
    return StructureRule(nbits=net.nbits, whole=pack(~net.region_of_last_layers(last_k).astype(bool)), pruned=pruned)


def check_structure(structure: np.ndarray, rule: StructureRule) -> None:
    """Raise CodecError("bad_structure") unless the packed `structure` is one pruning can produce."""
    try:
        packed = check_packed(structure, rule.nbits, "structure")
    except ValueError as err:
        raise CodecError("bad_structure", str(err)) from None
    missing = int(np.unpackbits(rule.whole & ~packed).sum())
    if missing:
        raise CodecError("bad_structure", f"{missing} elements of the unpruned layers are missing")
    bits = np.unpackbits(packed, count=rule.nbits)
    for layer in rule.pruned:
        held = sum(int(bits[a:b].sum()) for a, b in layer.spans)
        if held != layer.kept:
            raise CodecError("bad_structure", f"layer {layer.index} holds {held} elements; pruning keeps "
                                              f"exactly {layer.kept}")


def random_structure(rule: StructureRule, rng: np.random.Generator) -> np.ndarray:
    """A valid structure (packed) with a random choice of kept elements in each pruned layer: what
    emulated devices and tests announce when they do not train (real devices run one_shot_prune)."""
    bits = np.unpackbits(rule.whole, count=rule.nbits).astype(bool)
    for layer in rule.pruned:
        where = np.concatenate([np.arange(a, b) for a, b in layer.spans])
        bits[rng.choice(where, size=layer.kept, replace=False)] = True
    return pack(bits)
