"""Delta coding in the async stream (`--mode async --coding delta` workers, issue 14 in issue 13's stream).

Pure: no Redis, no broker. The async core hands these the masks Redis holds for a board (the newest two
it published, aggregator/store.py held_masks; version 0 is the initial mask).

Uplink: a delta-coded update is decoded at ingest against the merged mask of the version it names
(shared.rounds.undelta_update), so Redis keeps the raw update and the flush and the replay never see a
delta. Downlink: unlike a round's close (shared.rounds.delta_downlink codes against the update the
device sent), a flush's mask is coded against the board's previous merged mask. In the stream a board
has trained and sent its next update before the flush of the last one reaches it (its next task is sent
at once), so its last update is no longer the one it holds; its newest merged mask is (downlink_base).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from shared import codec
from shared.bits import select_at
from shared.delta_codec import code_mask, layer_segments
from shared.rounds import DeviceRecord

# The refusals of a delta-coded update that its board cannot see: after them it gets its next task
# anyway (its worker then sends raw bits: shared/device.py never codes twice against one base).
DELTA_REFUSALS = ("stale_base", "bad_base", "bad_delta")


def downlink_base(update: codec.Message, held: dict[int, bytes], version: int) -> int | None:
    """The version a flush's mask `version` for this board may be coded against, or None (raw): the
    newest mask Redis holds for it older than `version` (older: a repeated flush, after set_masks stored
    `version` itself, codes against the same one), if the board's update asked for a delta downlink and
    trained from that mask or the one before it (version 0, the initial mask, counts as held).

    The one before counts because a board has usually trained its next update before its last flush's
    mask arrived, and then applied that mask in order: every mask sent is raw or coded against one the
    board held, so it holds the newest. A board that lost a mask (its queue gone) refuses the next one
    (stale_base) and its update's base falls two behind: its next mask goes raw and resynchronises it."""
    if update.downlink != "delta" or update.version is None:
        return None
    older = sorted({0, *(v for v in held if v < version)})
    return older[-1] if update.version in older[-2:] else None


def code_downlink(msg: codec.Message, base_full: np.ndarray, base_version: int, rec: DeviceRecord, *,
                  nbits: int, layer_sizes: Sequence[int]) -> codec.Message:
    """`msg` (a raw mask message inside the board's structure) coded against the packed full mask
    `base_full` of version `base_version`, if coding pays; else `msg` as it is."""
    if msg.enc != "structure" or msg.bits is None or msg.nbits is None:
        return msg
    where = rec.where(nbits)
    base = select_at(base_full, where, nbits).tobytes()
    coded = code_mask(msg.bits, msg.nbits, base, base_version, layer_segments(where, layer_sizes))
    if coded.enc == "structure":
        return msg
    return replace(msg, enc="delta", bits=coded.bits, crc32=zlib.crc32(coded.bits), base=coded.base,
                   mask_crc32=coded.mask_crc32)
