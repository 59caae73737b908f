"""JSONL reading and atomic writing shared by the merger and the post-processing commands."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from stage_a.errors import UserError
from stage_a.records import RecordError, validate_record


def _open_temp(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` next to ``path`` (same filesystem, so os.replace is atomic)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            # Mode 0o666 lets the umask decide, like a normally created file (mkstemp would give 0600).
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_files(*paths: Path) -> Iterator[list[TextIO]]:
    """Write several files as one: the block writes temp files beside ``paths``, which replace them
    together when it ends normally. On any failure (full or read-only disk: a UserError naming the
    path; an exception in the block; KeyboardInterrupt) every path keeps its old content: all is
    written and fsynced before the first rename, and a failed rename restores the paths already
    replaced (their old content is kept as hard links). Only a kill between two renames can mix them."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    files: list[TextIO] = []
    backups: dict[Path, Path | None] = {}
    current: Path | None = targets[0] if targets else None
    try:
        try:
            for path in targets:
                current = path
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = _open_temp(path)
                temps.append(tmp)
                files.append(os.fdopen(fd, "w", encoding="utf-8", newline="\n"))
            current = None  # a write of the block: any of the files
            yield files
            for path, f in zip(targets, files, strict=True):
                current = path
                f.flush()
                os.fsync(f.fileno())
                f.close()
            for path, tmp in zip(targets, temps, strict=True):
                current = path
                if path.exists():
                    # Rewriting in place must not change who may read the file.
                    os.chmod(tmp, path.stat().st_mode & 0o7777)
            for path in targets[:-1]:  # the last one replaced needs no way back
                current = path
                backups[path] = _keep_old(path)
            done: list[Path] = []
            try:
                for path, tmp in zip(targets, temps, strict=True):
                    current = path
                    os.replace(tmp, path)
                    done.append(path)
            except OSError:
                for path in reversed(done):
                    old = backups.get(path)
                    if old is not None:
                        os.replace(old, path)
                        backups[path] = None
                    else:
                        path.unlink(missing_ok=True)
                raise
        except OSError as exc:
            what = exc.strerror or str(exc)
            where = str(current) if current else " and ".join(str(p) for p in targets)
            raise UserError(f"cannot write {where}: {what}; "
                            f"{'nothing was replaced' if len(targets) > 1 else 'it was left as it was'}") from None
    finally:
        for f in files:
            try:
                f.close()
            except OSError:
                pass
        for tmp in temps:
            _unlink_quietly(tmp)
        for old in backups.values():
            if old is not None:
                _unlink_quietly(old)
    for folder in {p.parent for p in targets}:
        _fsync_dir(folder)


def _keep_old(path: Path) -> Path | None:
    """A hard link to ``path``'s current content (None when there is none), to put it back with."""
    if not path.exists():
        return None
    while True:
        backup = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:  # no hard links here: a copy does the same job
            import shutil

            shutil.copy2(path, backup)
            return backup


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` (newline added where missing) to ``path`` atomically; return the count.

    ``lines`` may read the current ``path``: it is consumed before the rename. On any exception the
    target is untouched and the temp file removed; a full or read-only disk is a UserError naming it."""
    count = 0
    with atomic_files(Path(path)) as (f,):
        for line in lines:
            f.write(line if line.endswith("\n") else line + "\n")
            count += 1
    return count


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, record)`` for every non-blank line, each validated against the contract.

    Raises UserError("<path>:<line_no>: <reason>") on the first bad line.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open: {e.strerror or e}") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_no}: not valid UTF-8") from None
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # tolerate a BOM added by editors
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})") from None
            try:
                validate_record(record)
            except RecordError as e:
                raise UserError(f"{path}:{line_no}: {e}") from None
            yield line_no, record


def resolve_target(path: Path, output: Path | None, inplace: bool) -> Path:
    """Where a rewrite of ``path`` goes: ``output``, or ``path`` itself when ``inplace``."""
    if output is not None and inplace and Path(output) != Path(path):
        raise UserError("give either --output OUT or --inplace, not both")
    if output is not None:
        return Path(output)
    if inplace:
        return Path(path)
    raise UserError("give --output OUT to write a new file, or --inplace to rewrite the input")
