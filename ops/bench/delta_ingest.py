"""What delta coding costs the aggregator per update: decode the message, decode the change against the
device's held mask, re-encode the raw update it stores (AggregatorCore._update's extra work), against
decoding a raw update alone.

`python -m ops.bench.delta_ingest --params 1000000 --flip 0.02` (a structure of density 0.8, three
layer segments, random masks: the coder's cost depends on sizes, hardly on the bits).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from shared import codec
from shared.bits import pack, select_at
from shared.delta_codec import code_mask, layer_segments
from shared.rounds import DeviceRecord, undelta_update


def measure(params: int, flip: float, repeats: int = 5) -> dict[str, float]:
    rng = np.random.default_rng(0)
    rec = DeviceRecord(pack(rng.random(params) < 0.8))
    where = rec.where(params)
    held = pack(rng.random(params) < 0.5)
    base = select_at(held, where, params)
    bits = np.unpackbits(base, count=len(where)).astype(bool) ^ (rng.random(len(where)) < flip)
    new = np.packbits(bits).tobytes()
    layers = [params * 6 // 10, params * 3 // 10, params - params * 6 // 10 - params * 3 // 10]
    start = time.perf_counter()
    coded = code_mask(new, len(where), base.tobytes(), 3, layer_segments(where, layers))
    encode_ms = 1e3 * (time.perf_counter() - start)
    head = {"device": "d1", "round": 4, "model": "a" * 32, "layout": "b" * 32}
    body = codec.encode(codec.make_update(**head, bits=coded.bits, nbits=len(where), version=3, enc=coded.enc,
                                          base=coded.base, mask_crc32=coded.mask_crc32, downlink="delta"))
    raw_body = codec.encode(codec.make_update(**head, bits=new, nbits=len(where), version=3))
    ingest, raw = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        codec.encode(undelta_update(codec.decode(body), rec, params, lambda _v: held))
        ingest.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(raw_body)
        raw.append(time.perf_counter() - t)
    return {"params": params, "flip": flip, "delta_bytes": len(body), "raw_bytes": len(raw_body),
            "encode_ms": round(encode_ms, 2), "ingest_ms_best": round(1e3 * min(ingest), 2),
            "ingest_ms_median": round(1e3 * float(np.median(ingest)), 2), "raw_decode_ms": round(1e3 * min(raw), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--flip", type=float, default=0.02)
    args = ap.parse_args()
    print(json.dumps(measure(args.params, args.flip)))


if __name__ == "__main__":
    main()
