"""The close's two costly steps at fleet size, out of AggregatorCore.close: building every
participant's downlink (and the mask Redis keeps for it), and publishing them all.

Why (profiled at 1,000 devices x 1M parameters, docs/results.md issue 14): the stored mask was the
published bits scattered back into the full mask, a 1M-position scatter per device that cost as much
as unpacking its update; it is the merged mask ANDed with the device's structure (the same bytes: the
published bits are the merged mask at the structure's positions), one pass over 125 kB. And each
confirmed publish waited a broker round trip before the next one started; a downlink that can publish
several at once (shared.amqp.PublisherPool) keeps a few in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from shared import codec
from shared.rounds import RoundState, delta_downlink, downlink_messages, mask_message, merge_round
from shared.transport import DeviceUnreachable

if TYPE_CHECKING:
    from aggregator.core import AggregatorCore


@runtime_checkable
class ManyDownlinks(Protocol):
    """A downlink that publishes several messages at once (shared.amqp.PublisherPool)."""

    def publish_downlinks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, BaseException | None]]:
        ...


def round_downlinks(core: AggregatorCore, rnd: RoundState) -> tuple[dict[str, codec.Message], dict[str, bytes]]:
    """Every participant's downlink message and the mask Redis keeps for it: for a bit rule the packed
    full merged mask (merged & structure: a rule never sets a bit outside it), for the agreement rule
    the q4 levels as published. The messages are shared.rounds.downlink_messages', as in the simulator."""
    if core.rule_downlink == "q4":
        messages = downlink_messages(core.rule, core.ctx, rnd, core._records, fingerprint=core.fingerprint,
                                     layout=core.layout)
        return messages, {d: msg.bits or b"" for d, msg in messages.items()}
    merged = merge_round(core.rule, core.ctx, rnd, core._records)
    messages, stored = {}, {}
    for d, m in merged.items():
        rec = core._records[d]
        messages[d] = mask_message(d, m, rec, round_id=rnd.round_id, fingerprint=core.fingerprint,
                                   layout=core.layout, nbits=core.nbits)
        stored[d] = np.bitwise_and(m, rec.structure).tobytes()
    return messages, stored


def publish_round(core: AggregatorCore, rnd: RoundState, messages: dict[str, codec.Message]) -> None:
    """Publish every downlink (confirmed), in device order; a board whose queue is gone is marked
    unreachable and skipped (AggregatorCore._send). The fault point "published" is reached once per
    confirmed mask, and a long close renews its lease as it goes."""
    def wires() -> Iterator[tuple[str, bytes]]:
        for device, msg in messages.items():
            rec = core._records[device]
            yield device, codec.encode(delta_downlink(msg, rnd, rec, nbits=core.nbits, layer_sizes=core.layer_sizes))

    def one_by_one() -> Iterator[tuple[str, BaseException | None]]:
        for device, body in wires():
            try:
                core.downlink.publish_downlink(device, body)
                yield device, None
            except DeviceUnreachable as err:
                yield device, err

    renewed = time.monotonic()
    downlink = core.downlink
    results = downlink.publish_downlinks(wires()) if isinstance(downlink, ManyDownlinks) else one_by_one()
    for device, err in results:
        if isinstance(err, DeviceUnreachable):
            core._unreachable(device, err)
        elif err is not None:
            raise err
        core._fault("published")
        if time.monotonic() - renewed > core.store.lease_ms / 3000:  # a long close keeps its lease
            core.store.renew_close(rnd.round_id)
            renewed = time.monotonic()
