"""Queue entries that never become a task: recorded in the dead_letters table, never fatal.

Celery and kombu handle a malformed entry at three depths, and at each depth some shape of bytes
stops the worker or loses the entry silently unless it is caught:
- the Redis transport pops and JSON-decodes the raw entry and builds a kombu Message from it
  (not JSON, not an envelope object, a body that is not valid base64, no delivery tag):
  `workers.transport.Channel`;
- Celery's consumer decodes the body and finds the task (a content type it refuses, such as
  pickle; an unknown task; a body that does not decode): `workers.consumer.Consumer`;
- celery-batches builds its request and, at flush time, unpacks the body as [args, kwargs, embed]
  (any other shape raises in the flush timer): `workers.tasks.ReconnectSafeBatches.Strategy`.
All of them end here: the reason and the raw entry (truncated) go to `ResultStore.dead_letter`,
and the entry is dropped (acknowledged) so that it is neither retried nor lost without a trace.

These run in the worker's main (consumer) process, which never touches the database otherwise:
the store is created on the first poison entry, and a forked pool process drops its copy.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from stage_a.errors import first_line

log = logging.getLogger(__name__)

RAW_LIMIT = 4000
"""Characters of a raw entry kept in the dead letter (and in the log line)."""


def raw_text(raw: Any, limit: int = RAW_LIMIT) -> str:
    """A printable, truncated rendering of whatever was on the queue."""
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw[: limit * 4]).decode("utf-8", errors="backslashreplace")
        size = len(raw)
    elif isinstance(raw, str):
        text, size = raw, len(raw)
    else:
        try:
            text = json.dumps(raw, ensure_ascii=False, default=repr)
        except Exception:
            text = repr(raw)
        size = len(text)
    text = text.replace("\x00", "\\x00")
    if len(text) > limit:
        text = f"{text[:limit]}... ({size} in all)"
    return text


def message_text(message: Any, limit: int = RAW_LIMIT) -> str:
    """The raw envelope of a kombu Message (what was on the queue), else its headers and body."""
    raw = getattr(message, "_raw", None)
    if raw is not None:
        return raw_text(raw, limit)
    return raw_text({"headers": getattr(message, "headers", None),
                     "content-type": getattr(message, "content_type", None),
                     "body": raw_text(getattr(message, "body", b""), limit)}, limit)


class PoisonSink:
    """Writes dead letters from the consumer process; one store, created lazily, never across fork."""

    def __init__(self) -> None:
        self._store: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _get_store(self) -> Any:
        if self._store is not None and self._pid != os.getpid():
            # Inherited through fork: never use the parent's connections (SQLAlchemy's advice).
            self._store.engine.dispose(close=False)
            self._store = None
        if self._store is None:
            from stage_a.store import ResultStore
            from workers.celery import settings

            self._store = ResultStore(settings.require_database(), migrate=False, pool_size=settings.db_pool_size,
                                      sqlite_busy_timeout=settings.sqlite_busy_timeout)
            self._pid = os.getpid()
        return self._store

    def record(self, reason: str, raw: Any, worker: str | None = None, run_id: int | None = None) -> None:
        """Dead-letter one queue entry; when the database cannot take it, the log line is its record."""
        text = raw if isinstance(raw, str) else raw_text(raw)
        log.error("dead-lettered queue entry: %s; entry: %.300s", reason, text)
        try:
            with self._lock:
                self._get_store().dead_letter(reason, text, worker or _worker_name(), run_id)
        except Exception as exc:  # a poison entry must never take the consumer down
            log.error("could not store the dead letter (%s); the entry was: %s",
                      first_line(exc), text)


def _worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


sink = PoisonSink()
"""The process's sink (the consumer hooks and the transport share it)."""
