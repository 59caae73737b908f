"""Thumbnails of a run's images: the path comes from the store, never from the request.

A thumbnail is addressed by (run, group position, image index). The file is the store's rel_path
under the run's recorded input root, resolved (symlinks included) and required to stay inside
that root; anything else is "not found". Resized JPEGs are kept in an in-memory LRU keyed by the
address and the file's mtime and size, so a replaced file is never served stale.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stage_a.paths import UnsafePath, resolve_under_root

if TYPE_CHECKING:
    from stage_a.store import ResultStore

THUMB_PX = 320
CACHE_BYTES = 64 * 1024 * 1024
DB_INT_MAX = 2**31 - 1
"""The largest run id, group position or image index the store's INTEGER columns hold (PostgreSQL int4)."""


class NotFound(Exception):
    """No such image, or its path is not inside the run's input root (same answer for both)."""


def resolve_inside(input_root: str, rel_path: str) -> str:
    """The real path of ``rel_path`` under ``input_root`` (stage_a.paths, the workers' rule); NotFound
    for absolute paths, '..', NUL bytes, symlinks or anything else whose real path leaves the root."""
    try:
        full = resolve_under_root(rel_path, input_root)
    except UnsafePath as exc:
        raise NotFound(str(exc)) from None
    if not full.is_file():
        raise NotFound("no such file")
    return str(full)


@dataclass(frozen=True)
class Thumb:
    body: bytes
    media_type: str
    etag: str


class Thumbnails:
    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._cache: OrderedDict[tuple[int, int, int, int, int], Thumb] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, run_id: int, group_position: int, image_index: int) -> Thumb:
        if not (0 < run_id <= DB_INT_MAX and 0 <= group_position <= DB_INT_MAX and 0 <= image_index <= DB_INT_MAX):
            raise NotFound("no such image")  # the database would refuse the number itself
        loc = self.store.queries.image_location(run_id, group_position, image_index)
        if loc is None:
            raise NotFound("no such image")
        path = resolve_inside(*loc)
        st = os.stat(path)
        key = (run_id, group_position, image_index, st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        thumb = self._render(path, f'"{run_id}-{group_position}-{image_index}-{st.st_mtime_ns}-{st.st_size}"')
        with self._lock:
            if key not in self._cache:
                self._cache[key] = thumb
                self._size += len(thumb.body)
            while self._size > CACHE_BYTES and self._cache:
                _, old = self._cache.popitem(last=False)
                self._size -= len(old.body)
        return thumb

    def _render(self, path: str, etag: str) -> Thumb:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as src:
                src.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced scale
                im = ImageOps.exif_transpose(src)
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=82)
            return Thumb(buf.getvalue(), "image/jpeg", etag)
        except Exception:  # unreadable or truncated image: say so in the picture, not with a broken icon
            return Thumb(_placeholder(), "image/png", etag)


@functools.cache
def _placeholder() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (THUMB_PX, THUMB_PX * 3 // 4), (236, 236, 240))
    draw = ImageDraw.Draw(im)
    draw.line((0, 0, im.width, im.height), fill=(200, 80, 80), width=3)
    draw.line((0, im.height, im.width, 0), fill=(200, 80, 80), width=3)
    draw.text((10, 10), "unreadable image", fill=(120, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
