"""StrategyStateStore: a strategy server half's state in Redis, so any aggregator replica (or a
restarted one) folds a round from the same state (issue 12, roadmap item 2).

Key layout (prefix <p>, default "fm:"):
  <p>strategy:state              string  JSON: strategy name, the half's small fields (version, held
                                         versions, counters) and the key of every tensor field
  <p>strategy:tensor:<field>:<k> string  one tensor each, in .npy format (numpy's header + raw bytes,
                                         read back with allow_pickle=False: never pickle)

A half's fields are classified by type, so every strategy of shared/strategies/ persists without code
of its own: an ndarray, a list of ndarrays (per-layer weights, FedDST's masks) or a map of such lists
(FedDST's masks per version) become tensor keys; everything else must be JSON. The constructor's
fields (spec, cfg, seed, rounds) and those it derives from them (ServerHalf.derived: FedMask's rule,
structure rule and device records) are not stored: the half is rebuilt from fm:config and then loaded.
FedMask's per-device structures live with each device (RoundStore.register_device), not here: every
enrol would otherwise rewrite them all, and replicas enrolling at once would race.
Updates themselves are not kept here: they go through RoundStore.ingest_update (SET NX per update).
"""

from __future__ import annotations

import io
import json
from typing import Any, Final, cast

import numpy as np

from aggregator.store import RoundStore, StoreError
from shared.strategies.base import ServerHalf

MAX_TENSOR_BYTES: Final = 64 * 1024 * 1024  # one tensor; a 16M-weight layer in float32
MAX_TENSORS: Final = 4096                     # tensor keys per state (layers x FedDST versions held)
MAX_STATE_JSON: Final = 4 * 1024 * 1024
_CONSTRUCTOR_FIELDS: Final = frozenset({"spec", "cfg", "seed", "rounds"})


def tensor_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def tensor_from_bytes(raw: bytes) -> np.ndarray:
    if len(raw) > MAX_TENSOR_BYTES + 4096:
        raise StoreError(f"a stored tensor is {len(raw)} bytes > limit {MAX_TENSOR_BYTES}")
    try:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except ValueError as exc:
        raise StoreError(f"a stored tensor does not decode: {exc}") from None


class StrategyStateStore:
    def __init__(self, store: RoundStore) -> None:
        self.store = store
        self.client, self.keys = store.client, store.keys
        self.state_key = self.keys.key("strategy:state")

    def save(self, server: ServerHalf) -> None:
        """Write the half's whole state in one MULTI: a reader never sees half of it. Tensor keys the
        new state no longer names (FedDST versions no device holds) are deleted in the same step."""
        fields: dict[str, Any] = {}
        tensors: dict[str, bytes] = {}

        def put(name: str, a: object) -> str:
            if not isinstance(a, np.ndarray):
                raise StoreError(f"{server.name}: field {name} holds a {type(a).__name__}, not an array")
            raw = tensor_bytes(a)
            if len(raw) > MAX_TENSOR_BYTES + 4096:
                raise StoreError(f"{server.name}: tensor {name} is {len(raw)} bytes > limit {MAX_TENSOR_BYTES}")
            key = self.keys.key(f"strategy:tensor:{name}")
            tensors[key] = raw
            return key

        for name, value in sorted(vars(server).items()):
            if name in _CONSTRUCTOR_FIELDS or name in server.derived:
                continue
            if isinstance(value, np.ndarray):
                fields[name] = {"array": put(name, value)}
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                fields[name] = {"arrays": [put(f"{name}:{i}", v) for i, v in enumerate(value)]}
            elif isinstance(value, dict) and value and all(isinstance(v, list) and v and
                                                           all(isinstance(a, np.ndarray) for a in v)
                                                           for v in value.values()):
                fields[name] = {"arrays_by": {str(k): [put(f"{name}:{k}:{i}", a) for i, a in enumerate(v)]
                                              for k, v in value.items()}}
            else:
                fields[name] = {"json": value}
        if len(tensors) > MAX_TENSORS:
            raise StoreError(f"{server.name}: {len(tensors)} tensors > limit {MAX_TENSORS}")
        try:
            state = json.dumps({"strategy": server.name, "fields": fields}, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{server.name}: a field is neither tensors nor JSON: {exc}") from None
        if len(state) > MAX_STATE_JSON:
            raise StoreError(f"{server.name}: state JSON is {len(state)} bytes > limit {MAX_STATE_JSON}")
        old = self._read_state()
        stale = sorted(set(_tensor_keys(old["fields"])) - set(tensors)) if old else []
        with self.store._guard("strategy_save"):
            pipe = self.client.pipeline(transaction=True)
            if tensors:
                pipe.mset(tensors)
            if stale:
                pipe.delete(*stale)
            pipe.set(self.state_key, state)
            pipe.execute()

    def raw(self) -> bytes | None:
        """The state's JSON as stored (None: no state yet); StrategyCore keys its cached half by it."""
        with self.store._guard("strategy_state"):
            return cast("bytes | None", self.client.get(self.state_key))

    def load(self, server: ServerHalf) -> None:
        """Set the freshly built half's fields from Redis; StoreError if the stored state belongs to
        another strategy or a tensor is missing or malformed."""
        state = self._read_state()
        if state is None:
            raise StoreError(f"no {server.name} state in Redis under {self.state_key}")
        if state.get("strategy") != server.name:
            raise StoreError(f"Redis holds {state.get('strategy')!r} state, not {server.name!r}")
        keys = _tensor_keys(state["fields"])
        with self.store._guard("strategy_load"):
            raws = cast(list["bytes | None"], self.client.mget(keys)) if keys else []
        got: dict[str, np.ndarray] = {}
        for key, raw in zip(keys, raws, strict=True):
            if raw is None:
                raise StoreError(f"strategy state names {key} but it is missing")
            got[key] = tensor_from_bytes(raw)
        for name, spec in state["fields"].items():
            if "array" in spec:
                value: object = got[spec["array"]]
            elif "arrays" in spec:
                value = [got[k] for k in spec["arrays"]]
            elif "arrays_by" in spec:
                value = {v: [got[k] for k in ks] for v, ks in spec["arrays_by"].items()}
            else:
                value = spec["json"]
            setattr(server, name, value)

    def _read_state(self) -> dict[str, Any] | None:
        with self.store._guard("strategy_state"):
            raw = self.client.get(self.state_key)
        if raw is None:
            return None
        try:
            return cast(dict[str, Any], json.loads(cast(bytes, raw)))
        except ValueError as exc:
            raise StoreError(f"strategy state is not JSON: {exc}") from None


def _tensor_keys(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for spec in fields.values():
        if "array" in spec:
            out.append(spec["array"])
        elif "arrays" in spec:
            out.extend(spec["arrays"])
        elif "arrays_by" in spec:
            for ks in spec["arrays_by"].values():
                out.extend(ks)
    return out
