"""The one resume contract, checked the same way for everything that iterates.

A component that iterates (the loader; anything else with ``state_dict`` / ``load_state_dict``)
passes when, for every cut point ``k``: a fresh instance that has yielded ``k`` items saves a state
(plain JSON, no pickle), a second fresh instance loads it, and that second instance yields exactly
the items the uninterrupted run yielded after ``k``, in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Resumable(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_resume(
    make: Callable[[], Resumable],
    points: Iterable[int],
    *,
    key: Callable[[Any], Any] = lambda item: item,
    make_resumed: Callable[[], Resumable] | None = None,
) -> list[Any]:
    """Assert "state at any point, then resume, yields exactly the rest" at each of ``points``.

    ``key`` turns an item into something comparable with ``==``; ``make_resumed`` builds the
    instance that loads the state (default: ``make``), e.g. one configured with other workers.
    Returns the uninterrupted sequence of keys.
    """
    full = [key(item) for item in make()]
    for k in points:
        first = make()
        it = iter(first)
        head = [key(next(it)) for _ in range(k)]
        assert head == full[:k], f"a fresh instance did not repeat the first {k} items"
        state = first.state_dict()
        assert json.loads(json.dumps(state)) == state, "state is not plain JSON"
        if hasattr(it, "close"):
            it.close()
        resumed = (make_resumed or make)()
        resumed.load_state_dict(state)
        rest = [key(item) for item in resumed]
        assert rest == full[k:], f"resuming after {k} of {len(full)} items did not yield exactly the rest"
    return full
