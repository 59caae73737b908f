"""Which model is this? One `Checkpoint` value per folder: where it is, what it is, its identity.

A farm must never summarize a run with another model than the one it names: runs record the
identity of their checkpoint at registration, workers compare it with the one they load, and every
result row records the identity that produced it.

The identity is a hash of content, never of where the folder is: the same bytes anywhere are one
model, and a copy that differs in any byte is another. It covers every byte of every regular
top-level file of the folder (symlinks followed, as in a Hugging Face snapshot): weights
(``*.safetensors``, ``*.bin``, ``*.pt``), every ``*.json`` config (model, generation, processor,
tokenizer, weight index), tokenizer files (``*.model``, ``merges.txt``, vocab files), chat
templates, and anything else there, with each file's name. Left out: subfolders, hidden files
(``.gitattributes``, ``.cache``) and documentation only (``README*``, ``LICENSE*``, ``*.md``). A
LoRA adapter's identity covers the adapter folder's files and its base model's identity.

Files are hashed with BLAKE3 (multithreaded, reading while hashing: disk speed on multi-GB shards), and
each file's digest is cached by its (device, inode, size, mtime, ctime), one small JSON per folder
under ``cache_dir``, so a restarted worker does not read the weights again. Any write changes a
file's ctime (even with its mtime put back), so a changed file is hashed again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from stage_a.errors import UserError

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
"""The identity recorded for runs with no checkpoint: the tiny random-weight demo model."""


def route_of(identity: str | None) -> str | None:
    """The queue route of a recorded model identity: itself when it is a content identity (or the demo
    model), None for one recorded before identities were by content (such runs wait on the plain queue,
    and a worker serves them with the model at their path)."""
    if identity and (identity == DEMO_MODEL or re.fullmatch(r"m-[0-9a-f]{24}", identity)):
        return identity
    return None


IDENTITY_PREFIX = "m-"
_IDENTITY_HEX = 24
_FORMAT = b"stage-a checkpoint identity v2\0"
_CHUNK = 16 << 20
"""Read size: large enough for BLAKE3 to spread each chunk over all cores."""
_RACY_NS = 100_000_000
"""A file changed this recently may change again within the same timestamp tick (its stat would
not show it): its digest is used but not cached."""
_CACHE_VERSION = 1


@dataclass
class HashCounters:
    """What identity computations read (benchmarks and tests observe the cache through it)."""

    files: int = 0
    bytes: int = 0


hashed = HashCounters()
"""Process-wide totals of file content hashed (cache hits add nothing)."""


@dataclass(frozen=True)
class Checkpoint:
    """A model folder or a LoRA adapter folder, read once and passed down."""

    path: Path
    """The folder, absolute and resolved."""
    name: str
    """The folder's name, for people: the identity does not contain it."""
    base: Path
    """The folder the base weights load from (``path`` itself unless this is an adapter)."""
    adapter: bool
    lora_rank: int
    """The adapter's largest rank over all modules (peft's rank_pattern may raise some above r); 0 if none."""
    processor: Path
    """Where the tokenizer and processor configs are: the adapter folder if it ships them, else the base."""
    identity: str
    """``m-<24 hex>``, a hash of the folder's content: what runs and result rows record."""
    base_identity: str
    """The base model's identity (``identity`` itself for a full model): the weights a worker must hold."""
    cache_dir: Path | None = None
    """Where file digests are cached (None: no cache)."""

    @classmethod
    def open(cls, folder: str | Path, cache_dir: Path | None = None) -> Checkpoint:
        """The checkpoint in ``folder``, or a UserError saying why it is not one (one line).

        ``cache_dir``: where per-file digests are kept between processes (``settings.cache_path / "identity"``)."""
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"checkpoint folder not found: {path}")
        path = path.resolve()
        adapter_cfg = path / "adapter_config.json"
        if not (path / "config.json").is_file():
            if not adapter_cfg.is_file():
                raise UserError(f"not a model or LoRA adapter folder (no config.json / adapter_config.json): {path}")
            base_folder, rank = _adapter_base(path, adapter_cfg)
            base = cls.open(base_folder, cache_dir)
            processor = path if (path / "tokenizer_config.json").is_file() else base.path
            return cls(path, path.name, base.path, True, rank, processor,
                       folder_identity(path, cache_dir, base.identity), base.identity, cache_dir)
        identity = folder_identity(path, cache_dir)
        return cls(path, path.name, path, False, 0, path, identity, identity, cache_dir)

    def reread(self) -> str:
        """The identity of what is in the folder now (a folder replaced while it loaded differs)."""
        return Checkpoint.open(self.path, self.cache_dir).identity


def _adapter_base(path: Path, adapter_cfg: Path) -> tuple[Path, int]:
    """The base model folder named by a LoRA adapter's config, and the adapter's largest rank."""
    try:
        cfg = json.loads(adapter_cfg.read_text())
        name = str(cfg.get("base_model_name_or_path") or "")
        rank = max([int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"unreadable LoRA adapter config {adapter_cfg}: {str(exc).splitlines()[0]}") from None
    folder = Path(name).expanduser()
    if not folder.is_absolute():  # relative to the adapter folder, never to this process's cwd
        folder = path / folder
    if not name or not folder.is_dir():
        raise UserError(f"LoRA base model folder not found: {name} (from {adapter_cfg})")
    return folder, rank


def defining_files(folder: Path) -> list[Path]:
    """The files the identity covers, sorted by name (see the module doc for the rule)."""
    out = []
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        n = f.name
        if n.startswith(".") or n.upper().startswith(("README", "LICENSE")) or n.lower().endswith(".md"):
            continue
        if f.is_file():
            out.append(f)
    return out


def folder_identity(folder: Path, cache_dir: Path | None = None, base_identity: str = "") -> str:
    """``m-<24 hex>`` over the names and content of ``folder``'s defining files (and a base's identity)."""
    cache = _DigestCache.load(cache_dir, folder)
    digest = blake3(_FORMAT)
    for f in defining_files(folder):
        try:
            file_digest, size = cache.digest(f)
        except OSError as exc:
            raise UserError(f"cannot read checkpoint file {f}: {exc.strerror or exc}") from None
        digest.update(f"{f.name}\0{size}\0".encode())
        digest.update(file_digest)
    digest.update(f"base\0{base_identity}".encode())
    cache.save()
    return IDENTITY_PREFIX + digest.hexdigest()[:_IDENTITY_HEX]


def _hash_file(f: Path, size: int) -> bytes:
    """BLAKE3 of the file, the next chunk read while the last one is hashed (BLAKE3 drops the GIL).
    Plain reads, not mmap: a file truncated under a mapping kills the process with SIGBUS."""
    hashed.files += 1
    h = blake3(max_threads=blake3.AUTO)
    if size <= _CHUNK:  # configs, tokenizers: one read
        data = f.read_bytes()
        hashed.bytes += len(data)
        h.update(data)
        return h.digest()
    buffers = (bytearray(_CHUNK), bytearray(_CHUNK))
    pending: Future[blake3] | None = None
    with f.open("rb", buffering=0) as fh, ThreadPoolExecutor(1) as hasher:
        for i in itertools.count():
            buf = buffers[i % 2]
            n = fh.readinto(buf)
            if pending is not None:
                pending.result()  # the other buffer is free again
            if not n:
                break
            pending = hasher.submit(h.update, memoryview(buf)[:n])
            hashed.bytes += n
    return h.digest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class _DigestCache:
    """Per-file digests of one folder, kept in ``<cache_dir>/<hash of the folder path>.json``."""

    def __init__(self, file: Path | None, entries: dict[str, dict[str, object]]) -> None:
        self.file = file
        self.old = entries
        self.new: dict[str, dict[str, object]] = {}

    @classmethod
    def load(cls, cache_dir: Path | None, folder: Path) -> _DigestCache:
        if cache_dir is None:
            return cls(None, {})
        file = cache_dir / f"{blake3(str(folder.resolve()).encode()).hexdigest()[:32]}.json"
        try:
            data = json.loads(file.read_text())
            entries = data["files"] if data.get("version") == _CACHE_VERSION else {}
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            entries = {}  # absent or unreadable: hashed again
        return cls(file, entries)

    def digest(self, f: Path) -> tuple[bytes, int]:
        """The digest of ``f`` and its size, from the cache when its stat is unchanged."""
        st = f.stat()
        key = _stat_key(st)
        hit = self.old.get(f.name)
        if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("blake3"), str):
            try:
                value = bytes.fromhex(str(hit["blake3"]))
                self.new[f.name] = hit
                return value, st.st_size
            except ValueError:
                pass
        started = time.time_ns()
        value = _hash_file(f, st.st_size)
        if _stat_key(f.stat()) != key:
            raise UserError(f"checkpoint file {f} changed while it was read: use the checkpoint once it is "
                            "no longer being written")
        if max(st.st_mtime_ns, st.st_ctime_ns) < started - _RACY_NS:  # a racily recent file is not cached
            self.new[f.name] = {"stat": key, "blake3": value.hex()}
        return value, st.st_size

    def save(self) -> None:
        """Write the cache when it changed; a cache that cannot be written is a warning, never a failure."""
        if self.file is None or self.new == self.old:
            return
        tmp: str | None = None
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": _CACHE_VERSION, "files": self.new}, fh)
            os.replace(tmp, self.file)
        except OSError as exc:
            log.warning("checkpoint identity cache not written (%s: %s); the next open hashes the files again",
                        self.file, exc.strerror or exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
