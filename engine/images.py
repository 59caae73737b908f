"""Reading images safely: confined to the input roots, EXIF-rotated, RGB, one-line errors."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from blake3 import blake3
from PIL import Image, ImageOps, UnidentifiedImageError

from stage_a import paths
from stage_a.reuse import FileSignature


class ImageError(Exception):
    """This image cannot be used; the message is the one-line reason stored for it."""


class PathOutsideRoots(ImageError):
    """A task named a file outside the configured input roots (poison message)."""


def resolve_under_root(rel_path: str, root: str | Path) -> Path:
    """stage_a.paths.resolve_under_root, its refusal as this image's error."""
    try:
        return paths.resolve_under_root(rel_path, root)
    except paths.UnsafePath as exc:
        raise PathOutsideRoots(str(exc)) from None


@dataclass(frozen=True)
class FileFacts:
    """What identifies the bytes read: their BLAKE3 digest, and the file's stat signature when it did not
    change while they were read (None: it did, or it is too recent to stand for them; stage_a.reuse)."""

    digest: str
    signature: FileSignature | None


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    size_before: tuple[int, int]  # (width, height) as stored in the file
    file_sha256: str
    facts: FileFacts


@dataclass
class ReadCounters:
    """Image files this process read (tests and benchmarks observe the reuse pre-check through it)."""

    files: int = 0
    bytes: int = 0


reads = ReadCounters()


MAX_FILE_BYTES = 256 * 2**20
"""Largest image file read (camera JPEGs are a few MiB): a multi-GB file named .jpg fails without
being read into memory first; the pixel-count guard then bounds what a small file may decode to."""


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file. Opening never blocks: a FIFO (or a
    folder) put where an image was after discovery is refused instead of hanging the worker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"not a regular file: {path.name}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation, read from the header only; None if unreadable."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _read(path: Path) -> tuple[bytes, FileSignature | None]:
    """The file's bytes (bounded by MAX_FILE_BYTES) and its signature if unchanged while read."""
    try:
        with _open_regular(path) as f:
            before = FileSignature.of(os.fstat(f.fileno()))
            data = f.read(MAX_FILE_BYTES + 1)
            after = FileSignature.of(os.fstat(f.fileno()))
    except OSError as exc:
        raise ImageError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    reads.files += 1
    reads.bytes += len(data)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"file too large: {path.name} (over {MAX_FILE_BYTES // 2**20} MiB)")
    if not data:
        raise ImageError(f"empty file: {path.name}")
    return data, before if before == after and not before.racy() else None


def read_facts(path: Path) -> FileFacts:
    """Hash the file's bytes without decoding them (the reuse step's content check)."""
    data, signature = _read(path)
    return FileFacts(blake3(data).hexdigest(), signature)


def load_image(path: Path) -> LoadedImage:
    """Decode fully (truncation is caught here, not inside the model batch) and normalize to RGB."""
    data, signature = _read(path)
    import io

    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat that as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as src:
                size_before = src.size
                src.load()
                rgb = _to_rgb(ImageOps.exif_transpose(src))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large (decompression bomb guard): {path.name}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file: {path.name}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt image {path.name}: {exc}") from None
    return LoadedImage(image=rgb, size_before=size_before, file_sha256=hashlib.sha256(data).hexdigest(),
                       facts=FileFacts(blake3(data).hexdigest(), signature))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale the format's range to 8 bits (Pillow's own conversion clips
        # everything above 255 to white); never stretch by the image's maximum, which would
        # turn a flat dark frame white.
        import numpy as np

        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return Image.fromarray((arr * 255 // 65535).astype("uint8"), "L").convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
