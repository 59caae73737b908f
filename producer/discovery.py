"""Find the photo groups of one mission (SPEC section 1).

Layout: ``<input_root>/<mission>/{审核通过,审核不通过}/<group_id>/<images>``.
Built for millions of files: one ``os.scandir`` per folder, plain strings in the hot loop and no
per-file ``stat`` beyond what ``DirEntry`` already knows.
"""

from __future__ import annotations

import logging
import os
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

_natural_key = natsort_keygen()


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


def discover(input_root: Path, mission: str) -> Discovery:
    """List the groups of ``mission`` under ``input_root``; raise UserError if there are none."""
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        logger.warning(msg)

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
            warn(f"skipping {kind} {mission}/{shown(entry.name)}: not 审核通过 or 审核不通过")

    groups: list[Group] = []
    for label_dir in _LABEL_ORDER:
        if label_dir not in label_dirs:
            continue
        label = LABEL_DIRS[label_dir]
        label_path = os.path.join(mission_dir, label_dir)
        try:
            entries = _list_dir(label_path)
        except OSError as exc:
            warn(f"skipping unreadable folder {mission}/{label_dir}: {exc.strerror or exc}")
            continue
        # Group folders in plain code-point order of their names (the group_id), as documented.
        for entry in sorted(entries, key=lambda e: e.name):
            gid = entry.name
            if not _utf8(gid):
                warn(f"skipping {'folder' if entry.is_dir() else 'file'} {mission}/{label_dir}/{shown(gid)}: "
                     f"name is not valid UTF-8")
                continue
            if not entry.is_dir():
                warn(f"skipping file {mission}/{label_dir}/{gid}: not a group folder")
                continue
            try:
                files = _list_dir(entry.path)
            except OSError as exc:
                warn(f"skipping unreadable group folder {mission}/{label_dir}/{gid}: {exc.strerror or exc}")
                continue
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
                continue
            prefix = f"{mission}/{label_dir}/{gid}/"
            groups.append(Group(gid, label, tuple(prefix + n for n in _natural_order(names))))

    if not groups:
        raise UserError(
            f"no image groups found in {mission_dir} "
            f"(expected 审核通过/<group_id>/ or 审核不通过/<group_id>/ folders holding .jpg/.jpeg/.png)"
        )
    return Discovery(input_root=root, mission=mission, groups=groups, warnings=warnings)
