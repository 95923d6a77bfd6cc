"""Read-ahead: a source's batches produced on a background thread, a bounded number ahead.

Reading (gzip inflate, CSV parsing, file reads) then overlaps with the writer's work on the
consumer's thread; zlib, Arrow and file reads release the GIL. Errors raised while reading are
re-raised in the consumer, in order; a consumer that stops early (an error of its own) stops the
producer, which closes the source's iterator on its own thread so files are released.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Yield what ``items`` yields, produced up to ``depth`` items ahead on a daemon thread."""
    q: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(_END)
        except BaseException as exc:  # travels to the consumer, raised there
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="hpstore-ingest-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
