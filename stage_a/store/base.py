"""What every part of the store shares: the engine, retries of transient failures, key chunking."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from stage_a.secrets import redact_url
from stage_a.store.engine import _first_line, make_engine, upgrade_schema
from stage_a.work import ImageKey

log = logging.getLogger(__name__)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _retrying(fn: Callable[[], T], what: str, attempts: int = 8, base_delay: float = 0.5) -> T:
    """Run a DB operation, retrying transient failures (server restart, SQLite lock) with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts or (isinstance(exc, DBAPIError) and not exc.connection_invalidated
                                       and not isinstance(exc, OperationalError)):
                raise
            delay = min(base_delay * 2 ** (attempt - 1), 10.0) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _first_line(exc), attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class StoreBase:
    """One engine per process (create it after fork); the parts of ResultStore build on it."""

    engine: Engine

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            upgrade_schema(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        return redact_url(self.url)


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL (a byte-level model can emit one): U+FFFD on every backend,
    so SQLite and PostgreSQL runs store and export the same text."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def _chunks(it: Any, size: int) -> Iterator[list[Any]]:
    iterator = iter(it)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _by_run(keys: Sequence[ImageKey]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    for run_id, ks in itertools.groupby(sorted(keys), key=lambda k: k.run_id):
        pairs = [(k.group_position, k.image_index) for k in ks]
        for chunk in _chunks(pairs, 500):
            yield run_id, chunk

