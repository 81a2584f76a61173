"""One bounded worker map: run a function over items in threads with at most ``ahead`` in flight,
results in the items' order. Used where the work releases the GIL (file reads and writes, hashing,
zstd, AES) so several cores share it while memory stays bounded."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def bounded_map(function: Callable[[Item], Result], items: Iterable[Item], *, workers: int,
                ahead: int) -> Iterator[Result]:
    """Yield ``function(item)`` for each item in order. The first exception is raised as its result
    comes up; the work not yet started is cancelled and the work started is waited for, so nothing
    runs on after the caller has seen the failure."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def run_bounded(function: Callable[[Item], object], items: Iterable[Item], *, workers: int, ahead: int) -> None:
    """``bounded_map`` for work whose results are not needed."""
    for _ in bounded_map(function, items, workers=workers, ahead=ahead):
        pass
