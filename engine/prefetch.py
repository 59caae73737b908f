"""A prefetching loader: the next batches are decoded and tokenized while the device generates."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[S, T]):
    """Runs ``prepare`` over ``sources`` in a background thread, ``depth`` results ahead.

    Decoding and the processor release the GIL, so one thread keeps the accelerator fed; the bounded
    queue caps host memory. Yields ``(source, prepared, error)`` in source order (a ``prepare`` that
    raised gives its error and the next sources still come); an error producing the sources is re-raised."""

    def __init__(self, prepare: Callable[[S], T], sources: Iterable[S], depth: int = 2) -> None:
        self._prepare = prepare
        self._sources = sources
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="stage-a-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for src in self._sources:
                if self._stop.is_set():
                    return
                try:
                    self._put((src, self._prepare(src), None))
                except Exception as exc:  # this source's failure, handed over with it
                    self._put((src, None, exc))
        except BaseException as exc:  # the sources broke: re-raised in the consumer, never lost
            self._put(_Failure(exc))
        finally:
            self._put(_DONE)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[S, T | None, Exception | None]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher[S, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
