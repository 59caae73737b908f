"""The one rule for reading an input file: a store path under the run's input root, and nothing else."""

from __future__ import annotations

import os
from pathlib import Path


class UnsafePath(ValueError):
    """A path that is empty, absolute, holds a NUL, or whose real path (symlinks followed) leaves the root."""


def resolve_under_root(rel_path: str, root: str | Path) -> Path:
    """The real path of ``rel_path`` below ``root``; refuses absolute paths, '..' and escaping symlinks."""
    if not isinstance(rel_path, str) or not rel_path:
        raise UnsafePath("empty image path")
    if "\x00" in rel_path or "\x00" in str(root) or not str(root):
        raise UnsafePath(f"invalid image path: {rel_path!r:.200}")
    if os.path.isabs(rel_path) or rel_path.startswith(("/", "\\")):
        raise UnsafePath(f"absolute path not allowed: {rel_path}")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, rel_path))
    if os.path.commonpath([root_real, full]) != root_real or full == root_real:
        raise UnsafePath(f"path leaves the input root: {rel_path}")
    return Path(full)
