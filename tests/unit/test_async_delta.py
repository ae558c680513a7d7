"""Delta coding in the async stream (aggregator/async_delta.py, shared/device.py): which base a flush's
mask may be coded against, and a board decoding a mask coded against the merged mask it holds (the
base older than the mask), exactly, or refusing it (stale_base) when it holds another version."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.async_delta import code_downlink, downlink_base
from shared import codec
from shared.bits import scatter_at
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import CodecError
from shared.presets import model_spec, preset
from shared.rounds import DeviceRecord, mask_message

TASK, WIDTH, SEED = "digits", 64, 0
SPEC = model_spec(TASK, width=WIDTH, seed=SEED)


def _update(version: int, downlink: str | None) -> codec.Message:
    return codec.make_update(device="d", round=3, model="a" * 64, layout="b" * 64, bits=b"\x00", nbits=8,
                             version=version, downlink=downlink)


@pytest.mark.parametrize(("held", "version", "flush", "expected"), [
    ({}, 0, 1, 0),                   # no mask published yet: the initial mask, version 0
    ({2: b"", 5: b""}, 5, 6, 5),     # trained from the newest held mask
    ({2: b"", 5: b""}, 2, 6, 5),     # from the one before: the newest reached it since (masks arrive in order)
    ({5: b""}, 0, 6, 5),             # the initial mask is the one before the first
    ({2: b"", 5: b""}, 1, 6, None),  # two behind: it may have lost a mask, raw resynchronises it
    ({5: b"", 6: b""}, 5, 6, 5),     # a repeated flush 6 after set_masks stored it: coded the same
])
def test_a_flush_codes_against_the_newest_older_mask_the_board_trained_from(
        held: dict[int, bytes], version: int, flush: int, expected: int | None) -> None:
    assert downlink_base(_update(version, "delta"), held, flush) == expected
    assert downlink_base(_update(version, None), held, flush) is None  # a raw board: raw masks


def _board() -> DeviceRuntime:
    d = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED).devices[0]
    dev = DeviceRuntime(d.device_id, SPEC, FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1,
                                                         coding="delta"), (d.train.x, d.train.y), SEED)
    dev.hello()
    return dev


def _flush_mask(dev: DeviceRuntime, held_full: np.ndarray, base: int, version: int) -> tuple[codec.Message, bytes]:
    """A merged mask of `version` (the held one with a few bits flipped), coded against `held_full`."""
    assert dev.structure is not None
    rec = DeviceRecord(dev.structure.copy())
    merged = held_full.copy()
    merged[: 4] ^= 0x5A
    raw = mask_message(dev.device_id, merged, rec, round_id=version, fingerprint=dev.fingerprint,
                       layout=dev.layout, nbits=dev.nbits)
    sizes = [int(np.prod(shape)) for _, shape in dev.model.layout()]
    coded = code_downlink(raw, held_full, base, rec, nbits=dev.nbits, layer_sizes=sizes)
    return coded, raw.bits or b""


def test_a_board_applies_a_mask_coded_against_the_merged_mask_it_holds() -> None:
    dev = _board()
    assert dev.structure is not None
    initial = dev._initial  # version 0: the model seed's mask
    coded, bits = _flush_mask(dev, initial, 0, 1)
    assert coded.enc == "delta" and coded.base == 0 and len(coded.bits or b"") < len(bits)
    dev.handle_mask(coded)
    assert dev.mask_version == 1 and dev.held is not None and dev.held.tobytes() == bits
    # The next flush is coded against v1, which the board holds now.
    held_full = scatter_at(dev.held, np.flatnonzero(np.unpackbits(dev.structure)[: dev.nbits]), dev.nbits)
    coded2, bits2 = _flush_mask(dev, held_full, 1, 4)
    dev.handle_mask(coded2)
    assert dev.mask_version == 4 and dev.held.tobytes() == bits2


def test_a_board_refuses_a_mask_coded_against_a_version_it_does_not_hold() -> None:
    dev = _board()
    coded, _ = _flush_mask(dev, dev._initial, 0, 2)
    dev.mask_version = 1  # it holds v1 (not on disk here), the mask names v0
    with pytest.raises(CodecError) as info:
        dev.handle_mask(coded)
    assert info.value.reason == "stale_base" and dev.mask_version == 1
