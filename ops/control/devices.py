"""Removing a board for good and rotating its credentials: the broker side (management API) and the
aggregator's side (Redis) together, so a removed board is neither reachable nor sampled again."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aggregator.store import RoundStore
from ops.control.enrolment import DeviceCredentials, Management, ManagementError

log = logging.getLogger("fedmask.devices")


@dataclass(frozen=True)
class Removal:
    device_id: str
    was_enrolled: bool  # it had said hello to this aggregator
    parked_dropped: int  # its late update waiting for the next round
    stored_dropped: int  # its update in the open round (taken out; the round closes on the others)
    notes: list[str] = field(default_factory=list)


def remove_device(device_id: str, *, mgmt: Management, store: RoundStore, vhost: str) -> Removal:
    """Revoke the board's broker user (its open connections are closed at once), delete its queue, and
    forget it in Redis: never sampled again, every message still in flight from it refused with the
    reason `device_removed`, its parked and open-round updates resolved and counted. Redis is checked
    first, so a board is never revoked on the broker yet left sampled."""
    store.ping()
    mgmt.delete_device(device_id, vhost=vhost, delete_queue=True)
    was_enrolled = device_id in store.device_ids()
    current = store.current_round()
    info = store.info(current) if current is not None else None
    resolved = store.remove_device(device_id, current if info is not None and info.state == "open" else None)
    if resolved["parked"]:
        store.incr("removed:parked")
    if resolved["stored"]:
        store.incr("removed:stored")
    store.incr("devices:removed")
    notes = []
    if info is not None and info.state == "closing" and device_id in info.received:
        notes.append(f"round {current} was already closing: its update there is merged (unless that close is "
                     "resumed after a restart: then it is left out); its mask goes nowhere")
    log.info("device %s removed (parked %d, stored %d)", device_id, resolved["parked"], resolved["stored"])
    return Removal(device_id, was_enrolled, resolved["parked"], resolved["stored"], notes)


def rotate_device(device_id: str, *, mgmt: Management, vhost: str, amqp_host: str,
                  amqp_port: int) -> DeviceCredentials:
    """A new password for an enrolled board; the old one is refused from now on, and the board's open
    connections are closed (it reconnects with the new one once it has it)."""
    if not mgmt.is_enrolled(device_id, vhost=vhost):
        raise ManagementError(f"device {device_id} is not enrolled on vhost {vhost}: nothing to rotate "
                              "(`fedmask devices enroll` creates it)")
    return mgmt.enroll(device_id, vhost=vhost, amqp_host=amqp_host, amqp_port=amqp_port)


def readmit_removed(device_ids: list[str], store: RoundStore) -> list[str]:
    """Enrolling an id that was removed lets it say hello again (with a structure of its own)."""
    back = [d for d in device_ids if store.is_removed(d)]
    for d in back:
        store.readmit(d)
    return back
