"""Short-lived worker threads for one batch of blocking I/O calls.

Why not ``concurrent.futures``: its executors refuse new work once the interpreter starts shutting
down, so a checkpoint still being written when the training script returns would fail half-way.
Plain non-daemon threads that exit when their batch is done let the interpreter wait for the
write to finish, and leave nothing running between batches (nothing to leak across ``fork``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_parallel(
    fn: Callable[[T], R], items: Sequence[T], workers: int, *, name: str = "hpstore-io"
) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads, in order of ``items``.

    Workers take items in order, so putting the big items first balances the load. The first
    error stops the hand-out of further items and re-raises in the caller once running calls end.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    cursor = iter(range(len(items)))

    def work() -> None:
        while True:
            with lock:
                i = None if errors else next(cursor, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=work, name=f"{name}-{k}") for k in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
