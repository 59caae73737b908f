"""Publishing task messages to Redis in pipelined batches (not one round trip per image)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from stage_a.config import redact_url
from stage_a.errors import UserError
from stage_a.settings import FarmSettings
from stage_a.work import WorkItem
from workers.messages import group_payload, image_payload

log = logging.getLogger(__name__)
TASK_NAME = "stage_a.summarize"
PIPELINE_SIZE = 2000


def payloads_for(items: Iterable[WorkItem], sharding_mode: str) -> Iterator[dict[str, Any]]:
    """per_image: one message per image; per_group: one message per group."""
    if sharding_mode == "per_group":
        for _, group in itertools.groupby(items, key=lambda it: (it.key.run_id, it.key.group_position)):
            yield group_payload(list(group))
    else:
        for it in items:
            yield image_payload(it)


class Publisher:
    """Sends `stage_a.summarize` messages through Celery's own message format (JSON)."""

    def __init__(self, settings: FarmSettings) -> None:
        from celery import Celery

        self.settings = settings
        # A bare app (not workers.celery) keeps the producer free of worker imports.
        self.app = Celery("stage_a_producer", broker=settings.broker_url)
        self.app.conf.update(
            task_serializer="json", accept_content=["json"], task_default_queue=settings.queue,
            broker_connection_timeout=5, broker_connection_retry=True,
            broker_transport_options={"socket_connect_timeout": 5, "socket_timeout": 30, "retry_on_timeout": False,
                                      "max_retries": 3},
        )

    def check(self) -> None:
        """Fail fast with one line when Redis is unreachable."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=5)
        except Exception as exc:
            raise UserError(f"cannot reach broker {redact_url(self.settings.broker_url)}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def publish(self, payloads: Iterable[dict[str, Any]]) -> int:
        """Publish every payload; Redis commands are pipelined PIPELINE_SIZE at a time."""
        from celery.utils import uuid

        amqp = self.app.amqp
        sent = 0
        with self.app.producer_or_acquire() as producer:
            with producer.batch(PIPELINE_SIZE):
                for payload in payloads:
                    task_id = uuid()
                    message = amqp.create_task_message(task_id, TASK_NAME, (payload,), {})
                    amqp.send_task_message(producer, TASK_NAME, message, queue=self.settings.queue,
                                           serializer="json")
                    sent += 1
        return sent

    def queue_length(self) -> int:
        with self.app.connection_for_read() as conn:
            client = conn.default_channel.client
            return int(client.llen(self.settings.queue))

    def publish_items(self, items: Sequence[WorkItem], sharding_mode: str) -> int:
        return self.publish(payloads_for(items, sharding_mode))
