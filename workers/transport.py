"""kombu's Redis transport, with every popped entry checked before kombu trusts it.

kombu's Redis channel pops an entry (BRPOP, in the worker's event loop), JSON-decodes it and
builds a Message from it with no error handling: an entry that is not JSON, not an envelope
object, whose body is not valid base64 or that lacks a delivery tag raises out of the event loop,
Celery logs "Unrecoverable error" and the worker exits; the entry, already popped, is gone.
Here such an entry is dead-lettered (workers/poison.py); a well-formed one is delivered as by
kombu. kombu has no hook between the pop and the decode, so `Channel._brpop_read` is kombu's own
method with one call added; kombu is pinned to the version it was copied from and
tests/test_library_internals.py fails when that method changes. The worker's app selects this
transport with ``broker_transport`` (workers/celery.py).
"""

from __future__ import annotations

import binascii
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from workers.poison import sink


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
    """The Redis channel with a check between popping an entry and delivering it."""

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
