"""Find the photo groups of one mission (SPEC section 1).

Layout: ``<input_root>/<mission>/{审核通过,审核不通过}/<group_id>/<images>``.
Built for millions of files: one ``os.scandir`` per folder, plain strings in the hot loop and no
per-file ``stat`` beyond what ``DirEntry`` already knows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from natsort import natsort_keygen

from stage_a.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared against the lower-cased name
LABEL_DIRS = {"审核不通过": "fail", "审核通过": "pass"}
# Output order: fail groups first, then pass groups.
_LABEL_ORDER = ("审核不通过", "审核通过")
_MAX_LISTED = 20  # missions named in the "mission folder missing" error

_natsort_key = natsort_keygen()
_DIGITS = re.compile(r"([0-9]+)")


def _natural_key(name: str) -> tuple[str | int, ...]:
    """natsort's default key (natsort_keygen()), computed directly for ASCII names (6x faster;
    tests/test_discovery.py compares the two on random names); other names go to natsort."""
    if not name.isascii():
        return tuple(_natsort_key(name))  # type: ignore[arg-type]
    parts: list[str | int] = list(_DIGITS.split(name))
    parts[1::2] = [int(p) for p in parts[1::2]]  # type: ignore[misc]
    key = [p for p in parts if p != ""]
    if key and type(key[0]) is int:  # natsort: a key always starts with a string
        key.insert(0, "")
    return tuple(key)


@dataclass(frozen=True)
class Group:
    group_id: str
    label: str  # "pass" | "fail"
    # Paths relative to Discovery.input_root, posix style, in image order (image_1, image_2, ...).
    images: tuple[str, ...]


@dataclass
class Discovery:
    input_root: Path  # resolved absolute folder that contains the mission folder
    mission: str
    groups: list[Group]  # fail groups (by folder name), then pass groups (by folder name)
    warnings: list[str] = field(default_factory=list)


def _natural_order(names: list[str]) -> list[str]:
    # The plain name breaks ties between names natsort sees as equal ("x_02" vs "x_2"), so the
    # order never depends on the file system's listing order.
    return sorted(names, key=lambda n: (_natural_key(n), n))


def _list_dir(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)


def shown(name: str) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 as ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    """Whether ``name`` is valid UTF-8 on disk (os.scandir keeps other bytes as lone surrogates,
    which no database, JSONL or message can carry)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _resolve_root(input_root: Path, mission: str, warnings: list[str]) -> Path:
    """Return the folder that holds ``mission``; accept being handed the mission folder itself."""
    root = Path(os.path.abspath(os.path.expanduser(input_root))).resolve()
    if not _utf8(str(root)):
        raise UserError(f"input dir path is not valid UTF-8: {shown(str(root))} (rename the folder)")
    if not root.exists():
        raise UserError(f"input dir does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"input dir is not a directory: {root}")
    if (root / mission).is_dir():
        return root
    looks_like_mission = any((root / d).is_dir() for d in LABEL_DIRS)
    if root.name == mission or looks_like_mission:
        if root.name != mission:
            # Image paths and output records carry the mission name; a renamed folder would make
            # them lie, so refuse rather than guess.
            raise UserError(
                f"input dir {root} looks like a mission folder (it contains 审核通过/审核不通过) "
                f"but is named {root.name!r}, not the mission {mission!r}"
            )
        msg = f"input dir is the mission folder; using its parent {root.parent}"
        warnings.append(msg)
        logger.info(msg)
        return root.parent
    if (root / mission).exists():
        raise UserError(f"mission folder is not a directory: {root / mission}")
    try:
        found = sorted(shown(e.name) for e in _list_dir(str(root)) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UserError(f"cannot read input dir {root}: {exc.strerror or exc}") from exc
    listed = ", ".join(found[:_MAX_LISTED]) + (
        f", ... ({len(found)} in all)" if len(found) > _MAX_LISTED else ""
    )
    raise UserError(f"mission folder {mission!r} not found in {root}; folders there: {listed or '(none)'}")


@dataclass
class Scan:
    """A mission folder found and checked, its groups not listed yet: ``groups()`` streams them.

    Only the group folder names of one label are held at a time (to sort them), never the image
    paths of more than one group, so a run of millions of images is listed in little memory."""

    input_root: Path  # resolved absolute folder that contains the mission folder
    mission: str
    warnings: list[str]
    label_dirs: tuple[str, ...]  # the label folders present, in output order
    found: int = 0
    """Groups yielded so far (after a full pass: every group found)."""

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        logger.warning(msg)

    def groups(self) -> Iterator[Group]:
        """Fail groups (by folder name), then pass groups (by folder name), each listed when reached;
        raises UserError at the end when there is none."""
        mission, warn = self.mission, self._warn
        mission_dir = os.path.join(str(self.input_root), mission)
        self.found = 0
        for label_dir in self.label_dirs:
            label = LABEL_DIRS[label_dir]
            label_path = os.path.join(mission_dir, label_dir)
            try:
                names, not_dirs = _list_names(label_path)
            except OSError as exc:
                warn(f"skipping unreadable folder {mission}/{label_dir}: {exc.strerror or exc}")
                continue
            # Group folders in plain code-point order of their names (the group_id), as documented.
            names.sort()
            for gid in names:
                if not _utf8(gid):
                    warn(f"skipping {'file' if gid in not_dirs else 'folder'} {mission}/{label_dir}/{shown(gid)}: "
                         f"name is not valid UTF-8")
                    continue
                if gid in not_dirs:
                    warn(f"skipping file {mission}/{label_dir}/{gid}: not a group folder")
                    continue
                group = self._group(os.path.join(label_path, gid), label_dir, label, gid)
                if group is not None:
                    self.found += 1
                    yield group
            del names
        if not self.found:
            raise UserError(
                f"no image groups found in {mission_dir} "
                f"(expected 审核通过/<group_id>/ or 审核不通过/<group_id>/ folders holding .jpg/.jpeg/.png)"
            )

    def _group(self, path: str, label_dir: str, label: str, gid: str) -> Group | None:
        mission, warn = self.mission, self._warn
        try:
            files = _list_dir(path)
        except OSError as exc:
            warn(f"skipping unreadable group folder {mission}/{label_dir}/{gid}: {exc.strerror or exc}")
            return None
        # Hidden files are skipped: macOS "._x.jpg" resource forks carry image extensions but
        # are not images.
        names = []
        for f in files:
            if not f.name.lower().endswith(IMAGE_EXTENSIONS) or f.name.startswith(".") or not f.is_file():
                continue
            if not _utf8(f.name):
                warn(f"skipping image {mission}/{label_dir}/{gid}/{shown(f.name)}: name is not valid UTF-8")
                continue
            names.append(f.name)
        if not names:
            warn(f"skipping group {mission}/{label_dir}/{gid}: no .jpg/.jpeg/.png image")
            return None
        prefix = f"{mission}/{label_dir}/{gid}/"
        return Group(gid, label, tuple(prefix + n for n in _natural_order(names)))


def _list_names(path: str) -> tuple[list[str], set[str]]:
    """The entry names of ``path`` and those that are not folders (no DirEntry kept: a label folder
    may hold millions of groups)."""
    names: list[str] = []
    not_dirs: set[str] = set()
    with os.scandir(path) as it:
        for entry in it:
            names.append(entry.name)
            if not entry.is_dir():
                not_dirs.add(entry.name)
    return names, not_dirs


def scan(input_root: Path, mission: str) -> Scan:
    """Find ``mission`` under ``input_root`` and its label folders (errors and warnings about them
    come here, before any group is listed)."""
    warnings: list[str] = []
    root = _resolve_root(Path(input_root), mission, warnings)
    mission_dir = os.path.join(str(root), mission)
    try:
        top = _list_dir(mission_dir)
    except OSError as exc:
        raise UserError(f"cannot read mission folder {mission_dir}: {exc.strerror or exc}") from exc
    label_dirs: set[str] = set()
    for entry in sorted(top, key=lambda e: e.name):
        if entry.name in LABEL_DIRS and entry.is_dir():
            label_dirs.add(entry.name)
        else:
            kind = "folder" if entry.is_dir() else "file"
            msg = f"skipping {kind} {mission}/{shown(entry.name)}: not 审核通过 or 审核不通过"
            warnings.append(msg)
            logger.warning(msg)
    return Scan(root, mission, warnings, tuple(d for d in _LABEL_ORDER if d in label_dirs))


def discover(input_root: Path, mission: str) -> Discovery:
    """List the groups of ``mission`` under ``input_root``; raise UserError if there are none."""
    found = scan(input_root, mission)
    groups = list(found.groups())
    return Discovery(input_root=found.input_root, mission=mission, groups=groups, warnings=found.warnings)
