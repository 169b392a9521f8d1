"""An order-preserving, bounded parallel map over threads.

Object reads wait on the network and Pillow releases the GIL while it decodes and resizes, so
threads give real parallelism here without pickling image bytes to other processes. Results come
out in input order whatever order the work finishes in, and only ``window`` items are in flight,
so memory stays bounded however long the input is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


def ordered_map(
    fn: Callable[[In], Out],
    items: Iterable[In],
    *,
    workers: int,
    window: int | None = None,
    name: str = "difftrain-data",
) -> Iterator[Out]:
    """``map(fn, items)`` computed by ``workers`` threads, yielded in input order.

    Closing the iterator early (``limit`` reached, an error downstream) cancels what has not
    started and waits for what has.
    """
    source = iter(items)
    try:
        if workers <= 1:
            yield from map(fn, source)
            return
        pending: deque[Future[Out]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
            try:
                for item in source:
                    pending.append(pool.submit(fn, item))
                    if len(pending) >= (window or workers * 4):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # stop the producer too (its reader threads, an open shard stream)
