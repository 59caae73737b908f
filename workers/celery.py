"""The Celery app: `celery -A workers worker` finds it here. Thin on purpose; see workers/tasks.py."""

from __future__ import annotations

import logging
import math
import sys
from typing import NoReturn

from celery import Celery

from stage_a.checkpoint import Checkpoint
from stage_a.errors import UserError
from stage_a.messages import CHUNK_IMAGES
from stage_a.queue import direct_queue, model_queue
from stage_a.settings import Settings


def refuse_to_start(exc: UserError) -> NoReturn:
    """A configuration error at worker start: one line on stderr and exit status 2, like the CLI."""
    sys.stderr.write(f"stage-a worker: error: {exc}\n")
    sys.stderr.flush()
    raise SystemExit(2) from None


try:
    settings = Settings.from_env()  # `celery -A workers worker` imports this module first
    # A pinned worker consumes its model's queue; an unpinned one is routed by workers/routing.py. Both
    # consume the plain queue too, where messages queued before per-model queues existed wait.
    queues = [direct_queue(settings.queue)]
    if settings.checkpoint:
        queues.append(direct_queue(model_queue(settings.queue, Checkpoint.open(settings.checkpoint, settings.cache_path / "identity").base_identity)))
except UserError as exc:
    refuse_to_start(exc)

app = Celery("stage_a", broker=settings.broker_url, include=["workers.tasks"])
if settings.broker_url.split("://", 1)[0] in ("redis", "rediss"):
    # kombu's Redis transport with each popped entry checked first: a malformed one is dead-lettered
    # instead of stopping the worker (workers/poison.py).
    app.conf.broker_transport = "workers.poison:Transport"
app.conf.update(
    # Every message Celery rejects is dead-lettered, and none can stop the consumer (workers/poison.py).
    worker_consumer="workers.poison:Consumer",
    # JSON only: a pickle payload is refused by the consumer before any code runs.
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_default_queue=settings.queue,
    task_queues=queues,
    # Ack after the batch function returned, i.e. after results are committed to the store.
    task_acks_late=True,
    task_reject_on_worker_lost=False,  # the store's leases recover lost work, not redelivery loops
    # celery-batches can only buffer what is prefetched: per pool process, two flushes of full chunks
    # (one running, one filling). Counted in messages: at a run's end chunks shrink, and so does what a
    # worker holds back from other hosts.
    worker_prefetch_multiplier=max(2, math.ceil(2 * settings.flush_images / CHUNK_IMAGES)),
    worker_max_tasks_per_child=None,
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,  # a restarted Redis is waited for, not fatal
    broker_transport_options={
        "visibility_timeout": int(settings.lease_seconds) + 60,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry_on_timeout": False,  # keeps kombu's pipelined batch publishing enabled
    },
    broker_heartbeat=0,
    # Each pool process loads its model in worker_process_init, before it takes any batch; Celery
    # kills a process that is not up within this (4 s by default: too short for a real checkpoint).
    worker_proc_alive_timeout=settings.model_load_timeout,
    # Flower reads these events.
    worker_send_task_events=True,
    task_send_sent_event=True,
)

# Alembic logs "Context impl ..." / "Will assume transactional DDL" at INFO on every connect check:
# worker logs carry stage-a's own INFO lines (model loaded, one per batch), not that chatter.
logging.getLogger("alembic").setLevel(logging.WARNING)

__all__ = ["app", "refuse_to_start", "settings"]
