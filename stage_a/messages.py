"""Task payloads on the broker (JSON only) and their validation: a bad message is poison, not a crash."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stage_a.work import ImageKey, WorkItem

TASK_NAME = "stage_a.summarize"
"""The one Celery task every message names."""
PAYLOAD_VERSION = 1
MAX_DB_INT = 2**31 - 1
MAX_IMAGES_PER_MESSAGE = 10_000
MAX_STORE_ID = 64


class PoisonMessage(ValueError):
    """A message that can never succeed (malformed, unknown run, path outside the roots)."""


class ForeignMessage(PoisonMessage):
    """A message enqueued against another store: its run id names none of this store's runs."""


def check_store(message: Message, store: str) -> None:
    """Refuse a message of another store; one naming none (queued before messages named it) passes."""
    if message.store is not None and message.store != store:
        raise ForeignMessage(f"message from store {message.store}, this worker's store is {store}: "
                             f"enqueued with another --db/STAGE_A_DATABASE_URL")


@dataclass(frozen=True)
class Message:
    """One payload, read: the store it was enqueued against and its work items."""

    store: str | None
    """The id of the store the run was registered in (ResultStore.store_id); None: a message queued
    before messages named their store."""
    items: list[WorkItem]


def image_payload(item: WorkItem, store: str) -> dict[str, Any]:
    """One message for one image of a run of store ``store`` (ResultStore.store_id)."""
    return {"v": PAYLOAD_VERSION, "store": store, **item.to_message()}


def group_payload(items: list[WorkItem], store: str) -> dict[str, Any]:
    """One message for a whole group (per_group sharding)."""
    first = items[0].key
    return {
        "v": PAYLOAD_VERSION, "store": store, "run_id": first.run_id, "group_position": first.group_position,
        "images": [{"image_index": it.key.image_index, "path": it.rel_path} for it in items],
    }


def payloads_for(items: Iterable[WorkItem], sharding_mode: str, store: str) -> Iterator[dict[str, Any]]:
    """per_image: one message per image; per_group: one message per group (items in group order)."""
    if sharding_mode == "per_group":
        for _, group in itertools.groupby(items, key=lambda it: (it.key.run_id, it.key.group_position)):
            yield group_payload(list(group), store)
    else:
        for it in items:
            yield image_payload(it, store)


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int or value < 0:  # bool is not an int here
        raise PoisonMessage(f"field {name!r} must be a non-negative integer, got {value!r:.80}")
    if value > MAX_DB_INT:  # beyond the database's integer: refused here, not by the database
        raise PoisonMessage(f"field {name!r} is out of range (at most {MAX_DB_INT}), got {value}")
    return value


def _path(obj: dict[str, Any]) -> str:
    value = obj.get("path")
    if not isinstance(value, str) or not value:
        raise PoisonMessage(f"field 'path' must be a non-empty string, got {value!r:.80}")
    if not value.isprintable():  # NUL and other control characters: no real file is named so
        raise PoisonMessage(f"field 'path' contains control characters: {value!r:.120}")
    return value


def _store(obj: dict[str, Any]) -> str | None:
    if "store" not in obj:
        return None
    value = obj["store"]
    if not isinstance(value, str) or not value or len(value) > MAX_STORE_ID or not value.isprintable():
        raise PoisonMessage(f"field 'store' must be a store id (a short printable string), got {value!r:.80}")
    return value


def parse_payload(payload: Any) -> Message:
    """The store and work items of one message; raises PoisonMessage naming what is wrong."""
    if not isinstance(payload, dict):
        raise PoisonMessage(f"payload must be a JSON object, got {type(payload).__name__}")
    return Message(_store(payload), _items(payload))


def _items(payload: dict[str, Any]) -> list[WorkItem]:
    run_id = _int(payload, "run_id")
    position = _int(payload, "group_position")
    if "images" in payload:
        images = payload["images"]
        if not isinstance(images, list) or not images:
            raise PoisonMessage("field 'images' must be a non-empty list")
        if len(images) > MAX_IMAGES_PER_MESSAGE:
            raise PoisonMessage(f"field 'images' lists {len(images)} images (at most {MAX_IMAGES_PER_MESSAGE})")
        items = []
        for entry in images:
            if not isinstance(entry, dict):
                raise PoisonMessage("each entry of 'images' must be an object")
            index = _int(entry, "image_index")
            items.append(WorkItem(ImageKey(run_id, position, index), _path(entry)))
        return items
    return [WorkItem(ImageKey(run_id, position, _int(payload, "image_index")), _path(payload))]
