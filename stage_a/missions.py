"""Missions, domain packs and prompt profiles, loaded from data files (SPEC sections 2 and 3).

Everything here is data so that adding a mission is a JSON edit, not a code change. The data
directory is the caller's ``data_dir`` (entry points pass ``Settings.data_dir``, STAGE_A_DATA_DIR);
empty or None means the ``stage_a/data`` package data. Parsed data is cached per directory.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage_a.errors import UserError

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the package supports 3.10
    from importlib.resources.abc import Traversable

DATASETS: tuple[str, ...] = ("bbu", "rru")
DATA_DIR_ENV = "STAGE_A_DATA_DIR"

DataDir = str | os.PathLike[str] | None


@dataclass(frozen=True)
class Mission:
    name: str
    dataset: str
    focus: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class DomainPack:
    name: str
    hint: str
    categories: tuple[str, ...]
    scenario_limits: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    system_base: str
    irrelevant_rule: str
    user_instruction: str


@dataclass(frozen=True)
class _Data:
    missions: dict[str, Mission]
    domains: dict[str, DomainPack]
    profiles: dict[str, Profile]


def _package_data() -> Traversable:
    return resources.files("stage_a").joinpath("data")


def _cache_key(data_dir: DataDir) -> str | None:
    """None for package data, else the resolved override directory."""
    if not data_dir:
        return None
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"data directory '{path}' does not exist (from data_dir or {DATA_DIR_ENV})")
    return str(path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load silently keeps the last duplicate key; a duplicated mission name is a data bug.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def _read_json(file: Traversable) -> dict[str, Any]:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data file '{file}': {exc}") from exc
    if not isinstance(obj, dict):
        raise UserError(f"data file '{file}' must hold a JSON object")
    return obj


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string")
    return value


def _texts(obj: dict[str, Any], key: str, where: str, *, allow_empty: bool) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where}: '{key}' must be a list of non-empty strings")
    if not value and not allow_empty:
        raise UserError(f"{where}: '{key}' must not be empty")
    return tuple(value)


def _profile_names(root: Traversable) -> list[str]:
    prompts = root.joinpath("prompts")
    if not prompts.is_dir():
        return []
    return sorted(f.name[: -len(".json")] for f in prompts.iterdir() if f.name.endswith(".json"))


@functools.lru_cache(maxsize=8)
def _load(key: str | None) -> _Data:
    root: Traversable = _package_data() if key is None else Path(key)

    domains: dict[str, DomainPack] = {}
    for ds in DATASETS:
        file = root.joinpath("domains", f"{ds}.json")
        obj = _read_json(file)
        domains[ds] = DomainPack(
            name=ds,
            hint=_text(obj, "hint", str(file)),
            categories=_texts(obj, "categories", str(file), allow_empty=False),
            scenario_limits=_texts(obj, "scenario_limits", str(file), allow_empty=True),
        )

    missions_file = root.joinpath("missions.json")
    missions: dict[str, Mission] = {}
    for name, entry in _read_json(missions_file).items():
        where = f"{missions_file} [{name}]"
        if not isinstance(entry, dict) or not name.strip():
            raise UserError(f"{where}: each mission must be a non-empty name mapped to an object")
        dataset = _text(entry, "dataset", where)
        if dataset not in DATASETS:
            raise UserError(f"{where}: dataset '{dataset}' is not one of {', '.join(DATASETS)}")
        missions[name] = Mission(
            name=name,
            dataset=dataset,
            focus=_text(entry, "focus", where),
            rules=_texts(entry, "rules", where, allow_empty=True),
        )
    if not missions:
        raise UserError(f"{missions_file}: no missions defined")

    profiles: dict[str, Profile] = {}
    for pname in _profile_names(root):
        file = root.joinpath("prompts", f"{pname}.json")
        obj = _read_json(file)
        profiles[pname] = Profile(
            name=pname,
            system_base=_text(obj, "system_base", str(file)),
            irrelevant_rule=_text(obj, "irrelevant_rule", str(file)),
            user_instruction=_text(obj, "user_instruction", str(file)),
        )
    return _Data(missions=missions, domains=domains, profiles=profiles)


def _data(data_dir: DataDir) -> _Data:
    return _load(_cache_key(data_dir))


def list_missions(*, data_dir: DataDir = None) -> list[str]:
    """Mission names in file order."""
    return list(_data(data_dir).missions)


def get_mission(name: str, *, data_dir: DataDir = None) -> Mission:
    missions = _data(data_dir).missions
    if name not in missions:
        raise UserError(f"unknown mission '{name}'; supported: {', '.join(missions)}")
    return missions[name]


def get_domain(dataset: str, *, data_dir: DataDir = None) -> DomainPack:
    domains = _data(data_dir).domains
    if dataset not in domains:
        raise UserError(f"unknown dataset '{dataset}'; supported: {', '.join(DATASETS)}")
    return domains[dataset]


def resolve_dataset(mission: Mission, dataset: str | None) -> str:
    """The mission's own dataset unless an explicit (non-empty) one overrides it."""
    if dataset is None or not dataset.strip():
        return mission.dataset
    # Launcher env vars are free text; accept " RRU " but nothing outside DATASETS.
    value = dataset.strip().lower()
    if value not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'; supported: {', '.join(DATASETS)}")
    return value


def get_profile(name: str, *, data_dir: DataDir = None) -> Profile:
    profiles = _data(data_dir).profiles
    if name not in profiles:
        raise UserError(f"unknown prompt profile '{name}'; supported: {', '.join(sorted(profiles))}")
    return profiles[name]


# Listing file names only (no parsing) keeps import cheap and import-safe even if a file is broken.
PROFILES: tuple[str, ...] = tuple(_profile_names(_package_data()))
