"""Strategy messages are untrusted input: tampered bytes and tampered fields decode or raise a
CodecError (never another exception), and the server halves refuse well-formed updates that do not
fit what they sent, each with a reason."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import CodecError
from shared.models import ModelSpec
from shared.payloads import dense_part, sparse_part
from shared.strategies import StrategyConfig
from shared.strategies.fedavg import FedAvgServer
from shared.strategies.feddst import FedDSTServer
from shared.strategies.zerofl import ZeroFLServer
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy

SPEC = ModelSpec("mlp", (16,), 4, width=8)
UPDATE = StrategyMessage(type="supdate", strategy="zerofl", device="d1", round=2, model="ab" * 8,
                         parts=(sparse_part("fc1", 128, [1, 5, 9], [0.5, -1.0, 2.0]), dense_part("fc2", np.ones(64))),
                         stats={"samples": 3, "loss": 0.5, "flops": 10.0, "dense_flops": 20.0})
BODY = encode_strategy(UPDATE)


def _decodes_or_codec_error(data: bytes) -> None:
    try:
        decode_strategy(data)
    except CodecError as exc:
        assert exc.reason  # a stable reason code, for the dead-letter header


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(BODY) - 1), st.integers(0, 255), st.integers(0, len(BODY)))
def test_tampered_bytes_decode_or_raise_a_codec_error(pos: int, value: int, cut: int) -> None:
    flipped = bytearray(BODY)
    flipped[pos] = value
    _decodes_or_codec_error(bytes(flipped))
    _decodes_or_codec_error(BODY[:cut])


wire_int = st.integers(-2**63, 2**64 - 1)  # what msgpack can carry
junk = st.one_of(st.none(), st.booleans(), wire_int, st.floats(), st.text(max_size=40), st.binary(max_size=40),
                 st.lists(wire_int, max_size=3),
                 st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), wire_int | st.floats(), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["type", "strategy", "device", "round", "model", "stats", "parts", "params", "v", "x"]), junk,
       st.sampled_from(["name", "enc", "n", "k", "dtype", "pos_enc", "pos", "values", "crc32", "extra"]), junk)
def test_tampered_fields_decode_or_raise_a_codec_error(key: str, value: Any, part_key: str, part_value: Any) -> None:
    raw = msgpack.unpackb(BODY, raw=False)
    raw[key] = value
    _decodes_or_codec_error(msgpack.packb(raw))
    raw = msgpack.unpackb(BODY, raw=False)
    raw["parts"][0][part_key] = part_value
    _decodes_or_codec_error(msgpack.packb(raw))


def _update(strategy: str, model: str, parts: list[Any], samples: int = 4) -> StrategyMessage:
    msg = StrategyMessage(type="supdate", strategy=strategy, device="d1", round=1, model=model, parts=tuple(parts),
                          stats={"samples": samples})
    return decode_strategy(encode_strategy(msg))


def test_fedavg_refuses_a_tensor_of_the_wrong_size() -> None:
    server = FedAvgServer(SPEC, StrategyConfig(), seed=0, rounds=1)
    parts = [dense_part(n, np.zeros(s + (1 if i == 0 else 0))) for i, (n, s) in enumerate(zip(server.names,
                                                                                            server.sizes, strict=True))]
    with pytest.raises(CodecError) as err:
        server.fold(1, {"d1": _update("fedavg", server.version, parts)})
    assert err.value.reason == "bad_value"


def test_feddst_refuses_an_unknown_base_and_a_readjustment_that_changes_the_density() -> None:
    server = FedDSTServer(SPEC, StrategyConfig(density_rule="uniform"), seed=0, rounds=10)
    good = [dense_part(n, np.ones(int(m.sum()))) for n, m in zip(server.names, server.m, strict=True)]
    with pytest.raises(CodecError) as err:
        server.fold(1, {"d1": _update("feddst", "cd" * 8, good)})
    assert err.value.reason == "stale_base"
    on = np.flatnonzero(server.m[0])
    grown = [sparse_part(f"{server.names[0]}.flip", server.m[0].size, on[:1]), *good]  # one out, none in
    with pytest.raises(CodecError, match="keeps"):
        server.fold(1, {"d1": _update("feddst", server.version, grown)})
    short = [dense_part(server.names[0], np.ones(3)), *good[1:]]
    with pytest.raises(CodecError, match="kept values"):
        server.fold(1, {"d1": _update("feddst", server.version, short)})


def test_zerofl_refuses_more_than_the_top_k_upload() -> None:
    cfg = StrategyConfig(sparsity=0.9, mask_ratio=0.2)
    server = ZeroFLServer(SPEC, cfg, seed=0, rounds=1)
    parts = [sparse_part(n, w.size, np.arange(w.size), np.ones(w.size)) for n, w in zip(server.names, server.w,
                                                                                      strict=True)]
    with pytest.raises(CodecError, match="top-K"):
        server.fold(1, {"d1": _update("zerofl", server.version, parts)})


def test_a_bytes_key_in_params_is_refused() -> None:
    raw = msgpack.unpackb(encode_strategy(StrategyMessage(type="stask", strategy="feddst", device="d", round=1,
                                                          model="ab" * 8, params={"alpha": 0.1})), raw=False)
    raw["params"] = {b"alpha": 0.1}
    with pytest.raises(CodecError) as err:
        decode_strategy(msgpack.packb(raw))
    assert err.value.reason == "bad_value"
