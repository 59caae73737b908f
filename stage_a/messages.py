"""Task payloads on the broker (JSON only) and their validation: a bad message is poison, not a crash.

A message is a chunk of one run's work: the keys of up to CHUNK_IMAGES images (whole groups for
per_group), never their paths (the worker reads each key's path from the store). Chunks shrink near
the end of a run (guided self-scheduling), so the last messages spread over every consumer.
Version-1 payloads (one image, or one group, with paths) queued before chunks are still served.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stage_a.work import ImageKey, WorkItem

TASK_NAME = "stage_a.summarize"
"""The one Celery task every message names."""
PAYLOAD_VERSION = 2
LEGACY_VERSION = 1
MAX_DB_INT = 2**31 - 1
MAX_IMAGES_PER_MESSAGE = 10_000
MAX_STORE_ID = 64
CHUNK_IMAGES = 32
"""Most images per message (a per_group group larger than this is still one message): ~60 bytes per
queued image in Redis against ~1,400 for a message per image, while a chunk stays a fraction of a flush."""
TAIL_SHARES = 16
"""Near the end of a run each chunk is 1/TAIL_SHARES of the images left (at most CHUNK_IMAGES)."""
_V2_FIELDS = frozenset({"v", "store", "run_id", "keys"})


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
    """One payload, read: the store it was enqueued against and the keys of its images."""

    store: str | None
    """The id of the store the run was registered in (ResultStore.store_id); None: a message queued
    before messages named their store."""
    keys: list[ImageKey]
    paths: list[str] | None = None
    """A version-1 message's path for each key (checked against the store's); None for a chunk."""


def chunk_payload(keys: list[ImageKey], store: str) -> dict[str, Any]:
    """One message for ``keys``, images of one run of store ``store`` (ResultStore.store_id)."""
    return {"v": PAYLOAD_VERSION, "store": store, "run_id": keys[0].run_id,
            "keys": [[position, index] for _, position, index in keys]}


def image_payload(item: WorkItem, store: str) -> dict[str, Any]:
    """A version-1 message for one image (what was queued before chunks)."""
    return {"v": LEGACY_VERSION, "store": store, **item.to_message()}


def group_payload(items: list[WorkItem], store: str) -> dict[str, Any]:
    """A version-1 message for a whole group (what per_group queued before chunks)."""
    first = items[0].key
    return {
        "v": LEGACY_VERSION, "store": store, "run_id": first.run_id, "group_position": first.group_position,
        "images": [{"image_index": it.key.image_index, "path": it.rel_path} for it in items],
    }


def payloads_for(items: Iterable[WorkItem], sharding_mode: str, store: str) -> Iterator[dict[str, Any]]:
    """The chunk messages of ``items`` (key order), streamed: see chunks()."""
    for chunk in chunks((it.key for it in items), sharding_mode):
        yield chunk_payload(chunk, store)


def chunks(keys: Iterable[ImageKey], sharding_mode: str, size: int = CHUNK_IMAGES,
           shares: int = TAIL_SHARES, least: int = 1) -> Iterator[list[ImageKey]]:
    """Keys (in key order) packed into chunks of one run: ``size`` images each while more than
    ``shares`` x ``size`` are left of the run, then ceil(left / ``shares``) but at least ``least`` (the
    run's model batch: a smaller piece would only cut one batch across consumers) (guided
    self-scheduling), so a run ends in small messages every consumer gets a share of. Only ``shares`` x
    ``size`` keys are held at a time. per_group: a group is never split (a chunk is whole groups, at least one)."""
    window = shares * size
    pending: deque[list[ImageKey]] = deque()  # units (an image, or a group) not yet sent, of one run
    held = 0
    for unit in _units(keys, sharding_mode):
        if pending and unit[0].run_id != pending[0][0].run_id:
            yield from _take(pending, held, size, shares, least)  # the end of that run's keys
            held = 0
        pending.append(unit)
        held += len(unit)
        while held >= window:  # at least a window left: ceil(left / shares) >= size
            chunk = _chunk(pending, size)
            held -= len(chunk)
            yield chunk
    yield from _take(pending, held, size, shares, least)


def _take(pending: deque[list[ImageKey]], held: int, size: int, shares: int, least: int) -> Iterator[list[ImageKey]]:
    """The tail of a run: chunks of ceil(left / shares) images, at least ``least``, at most ``size``."""
    while held > 0:
        chunk = _chunk(pending, max(1, min(size, max(least, math.ceil(held / shares)))), min(least, size))
        held -= len(chunk)
        yield chunk


def _chunk(pending: deque[list[ImageKey]], target: int, least: int = 1) -> list[ImageKey]:
    """Whole units from the front of ``pending``: as many as fit in ``target`` images, and more while under
    ``least`` (a group is never split), at least one."""
    chunk = list(pending.popleft())
    while pending and (len(chunk) + len(pending[0]) <= target or len(chunk) < least):
        chunk += pending.popleft()
    return chunk


def _units(keys: Iterable[ImageKey], sharding_mode: str) -> Iterator[list[ImageKey]]:
    if sharding_mode == "per_group":
        for _, group in itertools.groupby(keys, key=lambda k: (k.run_id, k.group_position)):
            members = list(group)
            for i in range(0, len(members), MAX_IMAGES_PER_MESSAGE):  # a message's bound (no real group is this big)
                yield members[i:i + MAX_IMAGES_PER_MESSAGE]
    else:
        for k in keys:
            yield [k]


def image_count(payload: Any) -> int:
    """How many images a payload carries, for sizing buffers; never raises (a malformed one counts 1)."""
    if isinstance(payload, dict):
        for name in ("keys", "images"):
            value = payload.get(name)
            if isinstance(value, list) and value:
                return min(len(value), MAX_IMAGES_PER_MESSAGE)
    return 1


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
    """The store and image keys of one message; raises PoisonMessage naming what is wrong."""
    if not isinstance(payload, dict):
        raise PoisonMessage(f"payload must be a JSON object, got {type(payload).__name__}")
    version = payload.get("v", LEGACY_VERSION)
    if version == PAYLOAD_VERSION and type(version) is int:
        return Message(_store(payload), _keys(payload))
    if version != LEGACY_VERSION or type(version) is not int:
        raise PoisonMessage(f"field 'v' must be {LEGACY_VERSION} or {PAYLOAD_VERSION}, got {version!r:.80}")
    items = _items(payload)
    return Message(_store(payload), [it.key for it in items], [it.rel_path for it in items])


def _image_list(payload: dict[str, Any], name: str) -> list[Any]:
    """Field ``name``: a non-empty list of at most MAX_IMAGES_PER_MESSAGE entries."""
    entries = payload.get(name)
    if not isinstance(entries, list) or not entries:
        raise PoisonMessage(f"field {name!r} must be a non-empty list")
    if len(entries) > MAX_IMAGES_PER_MESSAGE:
        raise PoisonMessage(f"field {name!r} lists {len(entries)} images (at most {MAX_IMAGES_PER_MESSAGE})")
    return entries


def _keys(payload: dict[str, Any]) -> list[ImageKey]:
    unknown = sorted(set(payload) - _V2_FIELDS)
    if unknown:
        raise PoisonMessage(f"unknown field {unknown[0]!r:.80} in a version-{PAYLOAD_VERSION} message")
    run_id = _int(payload, "run_id")
    out = []
    for entry in _image_list(payload, "keys"):
        if not isinstance(entry, list) or len(entry) != 2:
            raise PoisonMessage(f"each entry of 'keys' must be [group_position, image_index], got {entry!r:.80}")
        position, index = (_int({"keys[]": v}, "keys[]") for v in entry)
        out.append(ImageKey(run_id, position, index))
    return out


def _items(payload: dict[str, Any]) -> list[WorkItem]:
    run_id = _int(payload, "run_id")
    position = _int(payload, "group_position")
    if "images" in payload:
        items = []
        for entry in _image_list(payload, "images"):
            if not isinstance(entry, dict):
                raise PoisonMessage("each entry of 'images' must be an object")
            index = _int(entry, "image_index")
            items.append(WorkItem(ImageKey(run_id, position, index), _path(entry)))
        return items
    return [WorkItem(ImageKey(run_id, position, _int(payload, "image_index")), _path(payload))]
