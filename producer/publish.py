"""Publishing task messages to Redis in pipelined batches (not one round trip per image).

On Redis, messages are Celery's own protocol-2 JSON messages: Celery sends one real message
as a template, and each payload is stamped into it (_FastRedisPublish). Other brokers, or a
Celery/kombu whose message is not the one expected, use Celery's own send path
(stage_a.queue.TaskQueue.send). bench/README.md has the figures.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from stage_a.messages import TASK_NAME, chunk_payload, chunks
from stage_a.queue import PublishError, TaskQueue
from stage_a.work import ImageKey, WorkItem

log = logging.getLogger(__name__)


class Publisher(TaskQueue):
    """The run's messages onto the queue: on Redis through the fast path, else Celery's send."""

    def publish(self, payloads: Iterable[dict[str, Any]], queue: str | None = None) -> int:
        """Publish every payload to ``queue`` (default: the plain queue), in order; returns the count.
        PublishError says how many were sent when the broker refuses part-way (full) or goes away."""
        try:
            return self._publish(payloads, queue or self.settings.queue)
        except PublishError:
            raise
        except Exception as exc:
            from stage_a.outage import is_broker_error

            if is_broker_error(exc):  # before the first message (the template, the connection)
                raise PublishError(0, exc) from exc
            raise

    def _publish(self, payloads: Iterable[dict[str, Any]], queue: str) -> int:
        with self.app.connection_for_write() as conn:
            if getattr(conn.transport, "driver_type", "") != "redis":
                return self.send(payloads, queue)
            try:
                fast = _FastRedisPublish(self.app, conn, queue)
            except RuntimeError as exc:  # an unexpected kombu/Celery message: stay correct, be slow
                log.warning("fast publishing unavailable (%s); using Celery's send path", exc)
                return self.send(payloads, queue)
            return fast.publish(payloads)

    def publish_items(self, items: Iterable[WorkItem], sharding_mode: str, store_id: str,
                      route: str | None = None, batch_size: int = 1) -> int:
        """``publish_keys`` of the items' keys."""
        return self.publish_keys((it.key for it in items), sharding_mode, store_id, route, batch_size)

    def publish_keys(self, keys: Iterable[ImageKey], sharding_mode: str, store_id: str,
                     route: str | None = None, batch_size: int = 1) -> int:
        """The run's image keys (any iterable in key order, streamed) to the queue of its model ``route``
        (RunInfo.route) as chunk messages naming their store (ResultStore.store_id), none smaller than the
        run's model ``batch_size`` but the last. Returns the units queued: images (per_image) or groups
        (per_group); a PublishError's ``sent`` counts them too."""
        queued = array("q")  # units on the queue once each message is: 8 bytes a message of ~32 images

        def payloads() -> Iterator[dict[str, Any]]:
            total = 0
            for chunk in chunks(keys, sharding_mode, least=batch_size):
                total += len({k.group_position for k in chunk}) if sharding_mode == "per_group" else len(chunk)
                queued.append(total)
                yield chunk_payload(chunk, store_id)

        try:
            sent = self.publish(payloads(), self.queue_for(route))
        except PublishError as exc:
            if exc.sent:
                exc.sent = queued[exc.sent - 1]
            raise
        return queued[sent - 1] if sent else 0


class _FastRedisPublish:
    """Celery protocol-2 task messages straight into the Redis list, ~10x faster than Celery's send.

    Messages differ only in task id, delivery tag, args repr and body. Celery's public send path puts
    one real message on a scratch queue; it is read back, routed to the real queue, and its envelope
    JSON cut at those four fields, which are spliced in per payload and LPUSHed many per command
    through a non-transactional pipeline. tests/test_publish.py checks the result byte for byte
    against the message Celery writes and runs it through a real `celery worker`."""

    LPUSH_VALUES = 1000  # values per LPUSH command
    PIPELINE_COMMANDS = 10  # LPUSH commands per pipeline round trip
    _FIELDS = ("body", "id", "delivery_tag", "argsrepr")

    def __init__(self, app: Any, conn: Any, queue: str) -> None:
        from celery.utils.saferepr import saferepr
        from kombu.utils.json import dumps

        self._saferepr = saferepr
        self.argsrepr_maxsize = app.amqp.argsrepr_maxsize
        self._shapes: dict[tuple[Any, ...], str] = {}
        self.key = queue  # kombu LPUSHes a priority-0 message to the list named after the queue
        self.client = conn.default_channel.client
        declared = app.amqp.queues[queue]
        if declared.expires is not None or declared.max_priority:
            raise RuntimeError("fast publish supports a plain queue only (no expiry, no priorities)")
        raw = self._template(app, conn, declared)
        envelope = json.loads(raw)
        hdr, props = envelope["headers"], envelope["properties"]
        probe_id = hdr.get("id")
        if dumps(envelope) != raw.decode("utf-8"):
            raise RuntimeError("kombu's envelope does not round-trip through JSON")
        if props.get("body_encoding") != "base64" or envelope.get("content-encoding") != "utf-8":
            raise RuntimeError(f"unexpected kombu envelope encoding: {props}")
        if props.get("delivery_info", {}).get("exchange") != "":
            raise RuntimeError("fast publish supports the anonymous direct exchange only")
        if not (hdr.get("root_id") == props.get("correlation_id") == probe_id):
            raise RuntimeError("unexpected Celery task message headers")
        props["delivery_info"]["routing_key"] = queue
        # The protocol-2 body is [args, kwargs, embed]; only args changes: '[[' + payload + '], ...'.
        body = base64.b64decode(envelope["body"])
        _args, kwargs, embed = json.loads(body)
        if dumps([[{}], kwargs, embed]).encode("utf-8") != body:
            raise RuntimeError("unexpected Celery task body layout")
        self.body_tail = ("], " + dumps(kwargs) + ", " + dumps(embed) + "]").encode("utf-8")
        # Render the envelope once with a marker in each varying field, then cut it at the markers.
        marks = {f: f"\x00stage-a:{f}\x00" for f in self._FIELDS}
        hdr["id"] = hdr["root_id"] = props["correlation_id"] = marks["id"]
        hdr["argsrepr"], props["delivery_tag"] = marks["argsrepr"], marks["delivery_tag"]
        envelope["body"] = marks["body"]
        quoted = {json.dumps(m): f for f, m in marks.items()}  # a marker as it appears, quotes included
        parts = re.split("(" + "|".join(re.escape(q) for q in quoted) + ")", dumps(envelope))
        self.literals = parts[0::2]  # constant text between fields
        self.fields = [quoted[q] for q in parts[1::2]]  # which field goes in each gap

    def _template(self, app: Any, conn: Any, declared: Any) -> bytes:
        """One real message for an empty payload, sent by Celery to a scratch queue and read back."""
        from kombu import Producer

        scratch = f"{declared.name}.stage-a-template.{os.urandom(8).hex()}"
        message = app.amqp.create_task_message(next(_uuid4_strings(1)), TASK_NAME, ({},), {})
        try:
            producer = Producer(conn)
            producer.maybe_declare(declared)  # the real queue exists, as after a normal send
            app.amqp.send_task_message(producer, TASK_NAME, message, queue=scratch, serializer="json", declare=[])
            raw = self.client.rpop(scratch)
        finally:
            self.client.delete(scratch)
        if not raw:
            raise RuntimeError("Celery's template message is not on the scratch queue's list")
        return bytes(raw)

    def _argsrepr(self, args: tuple[dict[str, Any]]) -> str:
        """Celery's saferepr(args) (shown by Flower), 60 us -> 1 us. For a flat dict of ints and printable,
        backslash-free strings under the size limit it is exactly repr. A chunk's key pairs sit below
        saferepr's depth limit, each shown as ``[...]``: its text depends only on the other fields and the
        number of keys, so it is rendered once per such shape (tests/test_publish.py)."""
        payload = args[0]
        nested = False  # a field is a list (of lists)
        for value in payload.values():
            if type(value) is str:
                if "\\" in value or not value.isprintable():
                    break
            elif type(value) is list:
                if not all(type(k) is list for k in value):
                    break
                nested = True
            elif type(value) is not int:
                break
        else:
            if not nested:
                text = repr(args)
                if len(text) <= self.argsrepr_maxsize:
                    return text
            else:
                shape = tuple((k, True, len(v)) if type(v) is list else (k, False, v) for k, v in payload.items())
                known = self._shapes.get(shape)
                if known is None:
                    if len(self._shapes) >= 4096:  # a run has a handful of shapes; stay bounded anyway
                        self._shapes.clear()
                    known = self._shapes[shape] = str(self._saferepr(args, self.argsrepr_maxsize))
                return known
        return str(self._saferepr(args, self.argsrepr_maxsize))

    def encode(self, payload: dict[str, Any], task_id: str, delivery_tag: str) -> str:
        """The kombu envelope JSON (exactly what kombu LPUSHes) of one stage_a.summarize message."""
        body = b"[[" + json.dumps(payload).encode("utf-8") + self.body_tail
        values = {
            "body": '"' + base64.b64encode(body).decode("ascii") + '"',
            "id": '"' + task_id + '"',
            "delivery_tag": '"' + delivery_tag + '"',
            "argsrepr": json.dumps(self._argsrepr((payload,))),  # plain JSON types: stdlib == kombu
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
        pipe = self.client.pipeline(transaction=False)
        sizes: list[int] = []  # values per LPUSH of the pipeline not yet executed
        values: list[str] = []
        for payload in payloads:
            values.append(self.encode(payload, next(ids), next(ids)))
            if len(values) == self.LPUSH_VALUES:
                pipe.lpush(self.key, *values)  # LPUSH a b c == LPUSH a; LPUSH b; LPUSH c (FIFO kept)
                sizes.append(len(values))
                values = []
                if len(sizes) >= self.PIPELINE_COMMANDS:
                    sent = self._execute(pipe, sizes, sent)
                    sizes = []
        if values:
            pipe.lpush(self.key, *values)
            sizes.append(len(values))
        return self._execute(pipe, sizes, sent)

    @staticmethod
    def _execute(pipe: Any, sizes: list[int], sent: int) -> int:
        """Run the pipeline; returns ``sent`` plus its values pushed. An LPUSH refused (a full Redis
        answers OOM) or a lost connection is a PublishError with the count that is on the queue."""
        try:
            results = pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection went: what this pipeline pushed is unknown
            raise PublishError(sent, exc) from exc
        pushed = sum(n for n, r in zip(sizes, results, strict=True) if not isinstance(r, Exception))
        error = next((r for r in results if isinstance(r, Exception)), None)
        if error is not None:
            raise PublishError(sent + pushed, error)
        return sent + pushed


def _uuid4_strings(block: int = 4096) -> Iterator[str]:
    """Random (version 4) UUID strings like celery.utils.uuid(), from one os.urandom call per block
    (a syscall per id made ids a quarter of the publishing time)."""
    while True:
        raw = os.urandom(16 * block).hex()
        for i in range(0, 32 * block, 32):
            h = raw[i:i + 32]
            yield (f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}")
