"""JSONL reading and atomic writing shared by the merger and the post-processing commands."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


def atomic_write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` (a newline is added where missing) to ``path`` atomically; return the count.

    The final path only ever holds the old content or the complete new content. ``lines`` may be
    a generator that reads the current ``path``: it is fully consumed before the rename. On any
    exception (KeyboardInterrupt included) the temp file is removed and the target left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line if line.endswith("\n") else line + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            # Rewriting in place must not change who may read the file.
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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
