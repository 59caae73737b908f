"""Publishing task messages to Redis in pipelined batches (not one round trip per image).

On Redis, messages are Celery's own protocol-2 JSON messages, built once by Celery/kombu as a
template and then stamped per payload (_FastRedisPublish): ~28k messages/s instead of ~2.5k
(bench/control_plane.py). Other brokers, or a Celery/kombu whose message shape is not the one
expected, use Celery's own send path (stage_a.queue.TaskQueue.send).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from stage_a.messages import TASK_NAME, payloads_for
from stage_a.queue import TaskQueue
from stage_a.work import WorkItem

log = logging.getLogger(__name__)


class Publisher(TaskQueue):
    """The run's messages onto the queue: on Redis through the fast path, else Celery's send."""

    def publish(self, payloads: Iterable[dict[str, Any]]) -> int:
        """Publish every payload, in order; returns the count."""
        with self.app.connection_for_write() as conn:
            if getattr(conn.transport, "driver_type", "") != "redis":
                return self.send(payloads)
            try:
                fast = _FastRedisPublish(self.app, conn, self.settings.queue)
            except RuntimeError as exc:  # an unexpected kombu/Celery shape: stay correct, be slow
                log.warning("fast publishing unavailable (%s); using Celery's send path", exc)
                return self.send(payloads)
            return fast.publish(payloads)

    def publish_items(self, items: Sequence[WorkItem], sharding_mode: str) -> int:
        return self.publish(payloads_for(items, sharding_mode))


def _capturing_producer(conn: Any) -> Any:
    """A kombu Producer that records the final publish (after all of kombu's processing) instead of sending."""
    from kombu import Producer

    class Capturing(Producer):  # type: ignore[misc]
        captured: tuple[Any, ...] | None = None

        # kombu calls _publish(body, priority, content_type, content_encoding, headers, properties,
        # routing_key, mandatory, immediate, exchange, declare, ...) after all of its own processing.
        def _publish(self, body: Any, priority: Any, content_type: Any, content_encoding: Any,
                     headers: Any, properties: Any, routing_key: Any, mandatory: Any, immediate: Any,
                     exchange: Any, declare: Any, *rest: Any, **kw: Any) -> None:
            for entity in declare or ():
                self.maybe_declare(entity)  # the queue exists exactly as after a normal send
            self.captured = (body, priority, content_type, content_encoding, headers, properties,
                             routing_key, exchange)

    return Capturing(conn)


class _FastRedisPublish:
    """Celery protocol-2 task messages straight into the Redis list, ~10x faster than Celery's send.

    Celery + kombu spend ~0.3-0.4 ms of Python per message (routing, signals, serialization,
    envelope). Every ``stage_a.summarize`` message differs only in its task id, delivery tag, args
    repr and body, so we let Celery and kombu build ONE real message (a template, captured just
    before kombu would write it to Redis), render its envelope JSON once with markers in those
    fields, and per payload only splice the four values in; values are LPUSHed many per command
    through a non-transactional pipeline. tests/test_publish.py checks the result is byte-identical
    to the message Celery itself writes and that a real `celery worker` runs it.
    """

    LPUSH_VALUES = 1000  # values per LPUSH command
    PIPELINE_COMMANDS = 10  # LPUSH commands per pipeline round trip
    _FIELDS = ("body", "id", "delivery_tag", "argsrepr")

    def __init__(self, app: Any, conn: Any, queue: str) -> None:
        import json
        import re

        from celery.utils.saferepr import saferepr
        from kombu.utils.json import dumps

        self._saferepr = saferepr
        self._json = json.dumps  # payload values are plain JSON types: stdlib output == kombu's
        self.argsrepr_maxsize = app.amqp.argsrepr_maxsize
        probe_id = "00000000-0000-4000-8000-000000000000"
        producer = _capturing_producer(conn)
        message = app.amqp.create_task_message(probe_id, TASK_NAME, ({},), {})
        app.amqp.send_task_message(producer, TASK_NAME, message, queue=queue, serializer="json")
        if producer.captured is None:
            raise RuntimeError("kombu did not publish the template message (changed internals?)")
        body, priority, ctype, cenc, headers, properties, routing_key, exchange = producer.captured
        channel = conn.default_channel
        envelope = channel.prepare_message(body, priority, ctype, cenc, headers, properties)
        channel._inplace_augment_message(envelope, exchange, routing_key)  # base64 body, delivery info/tag
        if envelope["properties"].get("body_encoding") != "base64" or cenc != "utf-8":
            raise RuntimeError(f"unexpected kombu envelope encoding: {envelope['properties']}")
        if exchange or routing_key in getattr(channel, "_expires", {}):
            # A real exchange (fanout/topic routing) or an expiring queue: keep kombu's own path.
            raise RuntimeError("fast publish supports the anonymous direct exchange to a plain queue only")
        hdr, props = envelope["headers"], envelope["properties"]
        if not (hdr.get("id") == hdr.get("root_id") == props.get("correlation_id") == probe_id):
            raise RuntimeError("unexpected Celery task message headers")
        # The protocol-2 body is [args, kwargs, embed]; only args changes: '[[' + payload + '], ...'.
        _args, kwargs, embed = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
        self.body_tail = ("], " + dumps(kwargs) + ", " + dumps(embed) + "]").encode("utf-8")
        if dumps([[{}], kwargs, embed]).encode("utf-8") != (body if isinstance(body, bytes) else body.encode()):
            raise RuntimeError("unexpected Celery task body layout")
        # Render the envelope once with a marker in each varying field, then cut it at the markers.
        marks = {f: f"\x00stage-a:{f}\x00" for f in self._FIELDS}
        hdr["id"] = hdr["root_id"] = props["correlation_id"] = marks["id"]
        hdr["argsrepr"], props["delivery_tag"] = marks["argsrepr"], marks["delivery_tag"]
        envelope["body"] = marks["body"]
        rendered = dumps(envelope)
        quoted = {json.dumps(m): f for f, m in marks.items()}  # a marker as it appears, quotes included
        parts = re.split("(" + "|".join(re.escape(q) for q in quoted) + ")", rendered)
        self.literals = parts[0::2]  # constant text between fields
        self.fields = [quoted[q] for q in parts[1::2]]  # which field goes in each gap
        self.key = channel._q_for_pri(routing_key, priority)  # the Redis list kombu would LPUSH to
        self.client = channel.client

    def _argsrepr(self, args: tuple[dict[str, Any]]) -> str:
        """Celery's saferepr(args) (shown by Flower), but 60 us -> 1 us for plain image payloads.

        For a flat dict of ints and printable, backslash-free strings under the size limit,
        saferepr is exactly repr (checked in tests/test_publish.py); anything else takes saferepr.
        """
        payload = args[0]
        for value in payload.values():
            if type(value) is str:
                if "\\" in value or not value.isprintable():
                    break
            elif type(value) is not int:
                break
        else:
            text = repr(args)
            if len(text) <= self.argsrepr_maxsize:
                return text
        return str(self._saferepr(args, self.argsrepr_maxsize))

    def encode(self, payload: dict[str, Any], task_id: str, delivery_tag: str) -> str:
        """The kombu envelope JSON (exactly what kombu LPUSHes) of one stage_a.summarize message."""
        import base64

        body = b"[[" + self._json(payload).encode("utf-8") + self.body_tail
        values = {
            "body": '"' + base64.b64encode(body).decode("ascii") + '"',
            "id": '"' + task_id + '"',
            "delivery_tag": '"' + delivery_tag + '"',
            "argsrepr": self._json(self._argsrepr((payload,))),
        }
        lits = self.literals
        out = [lits[0]]
        for field, lit in zip(self.fields, lits[1:], strict=True):
            out.append(values[field])
            out.append(lit)
        return "".join(out)

    def publish(self, payloads: Iterable[dict[str, Any]]) -> int:
        """LPUSH one message per payload, in order (the worker pops the oldest first); returns the count."""
        sent = 0
        ids = _uuid4_strings()
        values: list[str] = []
        pipe = self.client.pipeline(transaction=False)
        queued = 0

        def push() -> None:
            nonlocal queued, values
            if values:
                pipe.lpush(self.key, *values)  # LPUSH a b c == LPUSH a; LPUSH b; LPUSH c (FIFO kept)
                queued += 1
                values = []

        for payload in payloads:
            values.append(self.encode(payload, next(ids), next(ids)))
            sent += 1
            if len(values) >= self.LPUSH_VALUES:
                push()
                if queued >= self.PIPELINE_COMMANDS:
                    pipe.execute()
                    queued = 0
        push()
        if queued:
            pipe.execute()
        return sent


def _uuid4_strings(block: int = 4096) -> Iterator[str]:
    """Random (version 4) UUID strings like celery.utils.uuid(), from one os.urandom call per block.

    str(uuid.uuid4()) costs a syscall and object churn per id; two ids per message made it a
    quarter of the publishing time.
    """
    import os

    while True:
        raw = os.urandom(16 * block).hex()
        for i in range(0, 32 * block, 32):
            h = raw[i:i + 32]
            yield (f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}")
