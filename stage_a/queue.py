"""The task queues on the broker: reach them, measure them, send to them, drop a run's entries.

A run's messages go to the queue of the model that serves it (`model_queue`: STAGE_A_QUEUE + "." +
the base model's identity), so a worker consumes only the queues of models it holds and never
receives a message it cannot serve. The plain STAGE_A_QUEUE is still consumed by every worker for
messages queued before routing existed. Everything that touches the queues goes through `TaskQueue`
(the producer's bulk publisher adds a faster send on top). Sending here is Celery's own send path,
the reference the fast path matches.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Iterable
from typing import Any

from stage_a.errors import UserError, first_line
from stage_a.messages import TASK_NAME, image_count
from stage_a.secrets import broker_error, redact_url
from stage_a.settings import Settings

PIPELINE_SIZE = 2000
SAFE_POLICY = "noeviction"
"""The only Redis maxmemory-policy that never drops a queued task (or kombu's binding keys)."""


class PublishError(Exception):
    """Sending stopped part-way (the broker is full, or went away): ``sent`` messages are on the queue
    (None: unknown), the rest are not; ``cause`` is the broker's own error (kombu's wrapping removed)."""

    def __init__(self, sent: int | None, cause: BaseException) -> None:
        while cause.__cause__ is not None:  # kombu's BatchPublishError wraps Redis's answer
            cause = cause.__cause__
        self.sent = sent
        self.cause = cause
        self.full = _is_full(cause)
        """Redis refused the write at maxmemory (OOM)."""
        super().__init__("OOM: Redis is at its maxmemory and refuses writes" if self.full
                         else first_line(cause, typed=True))


def _is_full(exc: BaseException) -> bool:
    from redis.exceptions import OutOfMemoryError

    return isinstance(exc, OutOfMemoryError) or "used memory > 'maxmemory'" in str(exc)


def model_queue(base: str, route: str | None) -> str:
    """The queue of the model identity ``route`` (the plain ``base`` queue for a run with none)."""
    return f"{base}.{route}" if route else base


def direct_queue(name: str) -> Any:
    """The kombu Queue ``name``, bound to its own direct exchange by its own name, as Celery declares a queue
    it sends to by name. Declared otherwise, Celery would bind every queue to the default exchange and
    routing key, and a message for one queue would be copied to all of them."""
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name, type="direct"), routing_key=name)


class TaskQueue:
    """One broker connection pool (a bare Celery app: no worker code) for the settings' queue."""

    def __init__(self, settings: Settings, fail_fast: bool = False) -> None:
        from celery import Celery

        self.settings = settings
        self.app = Celery("stage_a_producer", broker=settings.broker_url)
        options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30, "retry_on_timeout": False,
                                   "max_retries": 3}
        if fail_fast:  # views: a broker that is down is a note on the page, never a wait
            options.update(socket_connect_timeout=2, socket_timeout=3, max_retries=0)
        self.app.conf.update(
            task_serializer="json", accept_content=["json"], task_default_queue=settings.queue,
            broker_connection_timeout=5, broker_connection_retry=not fail_fast, broker_transport_options=options,
        )

    def check(self, refuse_eviction: bool = True) -> None:
        """Fail fast with one line (password hidden) when the broker is unreachable, or (``refuse_eviction``)
        when it is a Redis that may evict keys: an evicted queue loses tasks silently."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=5)
            policy = self.eviction_policy() if refuse_eviction else None
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc)) from None
        if policy is not None and policy != SAFE_POLICY:
            raise UserError(f"broker {redact_url(self.settings.broker_url)} has maxmemory-policy {policy}: Redis may "
                            f"evict queued tasks; set maxmemory-policy {SAFE_POLICY} (redis.conf, or CONFIG SET "
                            f"maxmemory-policy {SAFE_POLICY})")

    def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, read from INFO memory (which answers even where CONFIG is renamed
        away); None for another broker or a Redis that does not report it."""
        from redis.exceptions import ResponseError

        with self.app.connection_for_read() as conn:
            if getattr(conn.transport, "driver_type", "") != "redis":
                return None
            try:
                info = conn.default_channel.client.info("memory")
            except ResponseError:  # INFO disabled: nothing to judge by
                return None
        policy = info.get("maxmemory_policy")
        return str(policy) if policy else None

    def eviction_warning(self) -> str | None:
        """A note for views (which warn, never refuse) when the broker may evict queued tasks."""
        policy = self.eviction_policy()
        if policy is None or policy == SAFE_POLICY:
            return None
        return f"WARNING: the broker's maxmemory-policy is {policy}: it may evict queued tasks; set {SAFE_POLICY}"

    def queue_for(self, route: str | None) -> str:
        return model_queue(self.settings.queue, route)

    def send(self, payloads: Iterable[dict[str, Any]], queue: str | None = None) -> int:
        """One Celery task message per payload to ``queue`` (default: the plain queue), pipelined by kombu
        (6-8k msgs/s on 2 cores); returns the count."""
        from celery.utils import uuid

        amqp = self.app.amqp
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                with producer.batch(PIPELINE_SIZE):
                    for payload in payloads:
                        message = amqp.create_task_message(uuid(), TASK_NAME, (payload,), {})
                        amqp.send_task_message(producer, TASK_NAME, message, queue=queue or self.settings.queue,
                                               serializer="json")
                        sent += 1
        except Exception as exc:
            raise PublishError(None if sent else 0, exc) from exc  # a pipeline fails as a whole or in part
        return sent

    def length(self, queue: str | None = None) -> int:
        """Messages waiting on ``queue`` (default: the plain queue), not those delivered and unacknowledged."""
        return self.lengths([queue or self.settings.queue])[0]

    def lengths(self, queues: list[str]) -> list[int]:
        """Messages waiting on each of ``queues``, in one round trip."""
        if not queues:
            return []
        with self.app.connection_for_read() as conn:
            pipe = conn.default_channel.client.pipeline(transaction=False)
            for q in queues:
                pipe.llen(q)
            return [int(n) for n in pipe.execute()]

    def has_unacked(self, queue: str | Collection[str] | None = None) -> bool:
        """Whether some message of ``queue`` (a name or several; default: the plain queue) is delivered but not
        yet acknowledged."""
        names = {queue or self.settings.queue} if queue is None or isinstance(queue, str) else set(queue)
        return bool(self.unacked_queues(names))

    def unacked_queues(self, queues: Collection[str]) -> set[str]:
        """Which of ``queues`` have a message delivered but not yet acknowledged.

        kombu's Redis transport keeps all unacknowledged messages of a database in one hash of [message,
        exchange, routing_key]; one scan answers for every queue, stopping once all are found. An unreadable
        entry counts for all of them: never conclude early that messages were lost."""
        names = set(queues)
        found: set[str] = set()
        with self.app.connection_for_read() as conn:
            channel = conn.default_channel
            for _tag, raw in channel.client.hscan_iter(getattr(channel, "unacked_key", "unacked"), count=200):
                try:
                    _message, exchange, routing_key = json.loads(raw)
                except (ValueError, TypeError):
                    return names
                found |= names & {routing_key, exchange}
                if found == names:
                    break
        return found

    def restore_dead_holders(self) -> int:
        """Put back on their queues, at once, the unacknowledged messages of worker processes that died holding
        them (stage_a.held); returns how many. 0 on a broker other than Redis (its own redelivery applies)."""
        from stage_a.held import restore_dead_holders

        with self.app.connection_for_write() as conn:
            if getattr(conn.transport, "driver_type", "") != "redis":
                return 0
            return restore_dead_holders(conn.default_channel, self.settings.queue)

    def drop_run(self, run_id: int, store_id: str, queue: str | None = None, chunk: int = 5000) -> int:
        """Remove the run's messages still waiting on ``queue`` (default: the plain queue), each by its exact
        value (LREM): one a worker pops meanwhile is not found and the worker drops it. Another store's run
        of the same id keeps its messages. Returns how many images the removed messages carried."""
        removed = 0
        with self.app.connection_for_write() as conn:
            client = conn.default_channel.client
            key = queue or self.settings.queue
            start = 0
            while True:
                raws = client.lrange(key, start, start + chunk - 1)
                if not raws:
                    break
                ours = [(raw, payload) for raw in raws
                        if (payload := queued_payload(raw, store_id)) is not None and payload.get("run_id") == run_id]
                if ours:
                    pipe = client.pipeline(transaction=False)
                    for raw, _ in ours:
                        pipe.lrem(key, 1, raw)
                    removed += sum(image_count(p) for (_, p), n in zip(ours, pipe.execute(), strict=True) if int(n))
                start += len(raws) - len(ours)
        return removed


def queued_payload(raw: bytes, store_id: str) -> dict[str, Any] | None:
    """The payload of one queued kombu envelope of a stage_a.summarize message of store ``store_id`` (or
    naming no store: queued before messages did) with an integer run id; None: another store's, or not readable."""
    try:
        envelope = json.loads(raw)
        if envelope.get("headers", {}).get("task") != TASK_NAME:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        payload = args[0] if args and isinstance(args[0], dict) else {}
        if payload.get("store", store_id) != store_id:
            return None
        return payload if type(payload.get("run_id")) is int else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
