"""Queue entries that never become a task: each one a row of dead_letters, none fatal to a worker.

Celery and kombu handle a malformed entry at three depths; at each, some shape of bytes stops the
worker (the exception escapes into the event loop: "Unrecoverable error") or loses the entry:
- the Redis transport pops and JSON-decodes the raw entry and builds a kombu Message from it (not
  JSON, not an envelope object, a body that is not valid base64, no delivery tag): `Channel`, a
  kombu Redis channel that checks each entry between the pop and the delivery. kombu has no hook
  there, so `Channel._brpop_read` is kombu's own method with one call added; kombu is pinned to
  the version it was copied from and tests/test_library_internals.py fails when it changes;
- Celery's consumer decodes the body and finds the task (a content type it refuses, such as
  pickle; an unknown task; a body that does not decode; a missing header): `Consumer`;
- celery-batches unpacks the body as [args, kwargs, embed] at flush time, in its timer:
  `workers.tasks.ReconnectSafeBatches.Strategy` refuses other shapes on arrival.
Each ends in `sink`: the reason and the raw entry (truncated) become a dead letter and the entry
is acknowledged (workers/celery.py selects the transport and the consumer). This runs in the
worker's main process: its store is made on the first poison entry, never inherited across fork.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import threading
from queue import Empty
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from stage_a.errors import first_line
from workers.metrics import record_dead_letter

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
            from workers.celery import settings

            self._store = settings.open_store(migrate=False)
            self._pid = os.getpid()
        return self._store

    def record(self, reason: str, raw: Any, worker: str | None = None, run_id: int | None = None) -> None:
        """Dead-letter one queue entry; when the database cannot take it, the log line is its record."""
        text = raw if isinstance(raw, str) else raw_text(raw)
        log.error("dead-lettered queue entry: %s; entry: %.300s", reason, text)
        try:
            with self._lock:
                self._get_store().dead_letter(reason, text, worker or _worker_name(), run_id)
            record_dead_letter()
        except Exception as exc:  # a poison entry must never take the consumer down
            log.error("could not store the dead letter (%s); the entry was: %s",
                      first_line(exc), text)


def _worker_name() -> str:
    from workers.naming import process_name

    return process_name()


sink = PoisonSink()
"""The process's sink (the consumer hooks and the transport share it)."""


class BadEntry(ValueError):
    """A queue entry kombu cannot make a Message of; the text says why."""


def check_envelope(channel: Any, raw: bytes | str) -> dict[str, Any]:
    """The decoded kombu envelope of ``raw``, or BadEntry naming what is wrong with it."""
    try:
        envelope = loads(bytes_to_str(raw))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadEntry(f"queue entry is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(envelope, dict):
        raise BadEntry(f"queue entry is not a kombu envelope (a JSON {type(envelope).__name__})")
    props = envelope.get("properties")
    if not isinstance(props, dict):
        raise BadEntry("queue entry has no 'properties' object")
    if not isinstance(props.get("delivery_tag"), str | int) or isinstance(props.get("delivery_tag"), bool):
        raise BadEntry("queue entry has no delivery tag")
    info = props.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        raise BadEntry("queue entry has no delivery_info with exchange and routing_key")
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise BadEntry("queue entry headers are not an object")
    body = envelope.get("body")
    if body is not None and not isinstance(body, str | bytes):
        raise BadEntry(f"queue entry body is a JSON {type(body).__name__}, not a string")
    if body:
        try:
            channel.decode_body(body, props.get("body_encoding"))
        except (binascii.Error, ValueError, TypeError) as exc:
            raise BadEntry(f"queue entry body does not decode as {props.get('body_encoding')!r} "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return envelope


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with a check between popping an entry and delivering it."""

    def _checked(self, raw: bytes | str, queue: str) -> dict[str, Any] | None:
        try:
            return check_envelope(self, raw)
        except BadEntry as exc:
            sink.record(f"{exc} (queue {queue})", raw)
            return None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7.0's Channel._brpop_read, with _checked between the pop and _deliver.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = self._checked(item, dest)
            if message is not None:
                self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


def _drop(message: Any, errors: Any) -> None:
    """Acknowledge (reject without requeue) so the entry is neither redelivered nor left unacked."""
    try:
        message.reject_log_error(log, errors)
    except Exception as exc:
        log.error("could not drop a rejected message: %s", exc)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with every message it rejects dead-lettered and acknowledged."""

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        sink.record(f"message body does not decode ({first_line(exc, typed=True)[:300]})", message_text(message))
        super().on_decode_error(message, exc)  # logs it and acknowledges

    def on_unknown_message(self, body: Any, message: Any) -> None:
        sink.record("not a Celery task message (no task header)", message_text(message))
        super().on_unknown_message(body, message)  # warns and rejects

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        # Celery's own version reads more headers (raising on a message without them) and marks
        # the task failed in a result backend this app does not have: dead-letter and drop instead.
        headers = message.headers if isinstance(message.headers, dict) else {}
        sink.record(f"unknown task {str(headers.get('task'))[:200]!r}", message_text(message))
        _drop(message, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        sink.record(f"invalid task message ({first_line(exc, typed=True)[:300]})", message_text(message))
        super().on_invalid_task(body, message, exc)  # logs it and rejects

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        errors = self.connection_errors
        # kombu's Redis transport counts KeyError as a connection error; a message missing a
        # header raises it too, and must not make the worker reconnect (and redeliver it) forever.
        broker_errors = tuple(e for e in errors if not issubclass(e, LookupError))

        def on_task_received(message: Any) -> Any:
            try:
                return handler(message)
            except broker_errors:
                raise  # the broker connection itself: Celery reconnects
            except Exception as exc:
                sink.record(f"message could not be received ({first_line(exc, typed=True)[:300]})", message_text(message))
                _drop(message, errors)
                return None

        return on_task_received
