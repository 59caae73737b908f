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


def payload_keys(payload: dict[str, Any]) -> list[tuple[int, int]]:
    """The (group_position, image_index) of every image a payload carries: a chunk (version 2) or a
    version-1 message of one image or one group."""
    if payload.get("v") == 2:
        return [(p, i) for p, i in payload["keys"]]
    if "images" in payload:
        return [(payload["group_position"], img["image_index"]) for img in payload["images"]]
    return [(payload["group_position"], payload["image_index"])]


def decode(raw: bytes | dict[str, Any]) -> dict[str, Any]:
    """The task payload of one kombu envelope as Redis holds it (raw, or already parsed)."""
    import base64
    import json

    envelope = json.loads(raw) if isinstance(raw, bytes | str) else raw
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return dict(json.loads(body)[0][0])


def queued_payloads(client: Any, queue: str) -> list[dict[str, Any]]:
    """The task payloads waiting on ``queue`` and its per-model queues (decoded kombu envelopes)."""
    return [decode(raw) for raw in queued_raw(client, queue)]


def images_on(client: Any, name: str) -> int:
    """Images carried by the messages of the one Redis list ``name``."""
    return sum(len(payload_keys(decode(raw))) for raw in client.lrange(name, 0, -1))


def queued_images(client: Any, queue: str) -> int:
    """Images carried by the messages waiting on ``queue`` and its per-model queues."""
    return sum(len(payload_keys(p)) for p in queued_payloads(client, queue))


def unacked_images(client: Any) -> int:
    """Images carried by the messages delivered and not yet acknowledged (kombu's "unacked" hash of
    [envelope, exchange, routing key])."""
    import json

    return sum(len(payload_keys(decode(json.loads(v)[0]))) for v in client.hvals("unacked"))
