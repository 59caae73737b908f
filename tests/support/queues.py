"""A queue and its per-model queues (`<queue>.<model identity>`) on a test's Redis: names, contents, removal."""

from __future__ import annotations

from typing import Any


def queue_names(client: Any, queue: str) -> list[str]:
    """``queue`` and every per-model list of it that exists."""
    return [queue, *(k.decode() for k in client.scan_iter(match=f"{queue}.*", _type="list"))]


def queued_raw(client: Any, queue: str) -> list[bytes]:
    """The kombu envelopes waiting on ``queue`` and its per-model queues, oldest first within each."""
    return [raw for name in queue_names(client, queue) for raw in reversed(client.lrange(name, 0, -1))]


def clear(client: Any, queue: str) -> None:
    """Drop the messages of ``queue`` and of its per-model queues."""
    client.delete(*queue_names(client, queue))
