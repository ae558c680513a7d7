"""`PublisherPool`: a few confirmed `Publisher`s side by side, for a close that publishes one downlink per
participant.

Why: a `Publisher` waits for each message's confirm before it sends the next (pika's blocking
channel), so 1,000 merged masks cost 1,000 broker round trips one after the other; with `size`
connections, `size` are in flight (docs/results.md, issue 14). Each message keeps every guarantee
of `Publisher` (confirmed, mandatory, persistent, reconnect once); only their order across connections
is not kept, which the downlink does not need (one message per device queue per close).
"""

from __future__ import annotations

import queue as queue_mod
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType

from shared.amqp.publisher import Publisher
from shared.amqp.settings import AmqpSettings

_DONE = object()


class PublisherPool:
    """`size` Publishers; `publish_downlinks` spreads messages over them. Satisfies
    shared.transport.Transport (single publishes go through the first publisher)."""

    def __init__(self, settings: AmqpSettings, *, size: int = 4, declare: bool = False) -> None:
        if size < 1:
            raise ValueError("a publisher pool needs at least one publisher")
        self.settings = settings
        self.publishers = [Publisher(settings, declare=declare and i == 0) for i in range(size)]

    def publish_uplink(self, device_id: str, kind: str, body: bytes) -> None:
        self.publishers[0].publish_uplink(device_id, kind, body)

    def publish_downlink(self, device_id: str, body: bytes) -> None:
        self.publishers[0].publish_downlink(device_id, body)

    def publish_downlinks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, BaseException | None]]:
        """Publish (device, body) pairs, up to `size` at once; yields (device, None) once a message is
        confirmed, or (device, the exception) for one that failed (DeviceUnreachable: its queue is
        gone), in completion order. `items` is read lazily by the workers, so bodies can be encoded as
        they go. Every message has been tried when the iterator ends."""
        source = iter(items)
        lock = threading.Lock()
        done: queue_mod.Queue[object] = queue_mod.Queue()

        def work(pub: Publisher) -> None:
            try:
                while True:
                    with lock:
                        item = next(source, None)
                    if item is None:
                        return
                    device, body = item
                    try:
                        pub.publish_downlink(device, body)
                        done.put((device, None))
                    except Exception as err:  # reported to the caller, who decides what it means
                        done.put((device, err))
            except Exception as err:  # `items` itself failed (encoding a message): the caller sees it
                done.put(("", err))
            finally:
                done.put(_DONE)

        threads = [threading.Thread(target=work, args=(p,), name=f"downlink-{i}", daemon=True)
                   for i, p in enumerate(self.publishers)]
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            got = done.get()
            if got is _DONE:
                running -= 1
                continue
            assert isinstance(got, tuple)
            yield got
        for t in threads:
            t.join()

    def close(self) -> None:
        for p in self.publishers:
            p.close()

    def __enter__(self) -> PublisherPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
