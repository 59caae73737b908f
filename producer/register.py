"""Turn an input tree into a recorded run: discover, sample, store groups and pending images."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from producer.discovery import Group, Scan, scan
from producer.sampling import SampledStream
from stage_a.checkpoint import DEMO_MODEL, Checkpoint
from stage_a.config import RunSpec
from stage_a.errors import UserError
from stage_a.store import GroupInput, ResultStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    run_id: int
    spec: RunSpec
    groups: int
    images: int
    discovered_groups: int
    warnings: tuple[str, ...]
    route: str
    """The base model identity whose workers serve the run (its queue)."""
    existing: bool = False
    """An unfinished farm run with the same inputs existed: ``run_id`` is that run and nothing was scanned
    or recorded (``groups``, ``images`` and ``discovered_groups`` are that run's recorded counts)."""


COSMETIC_PARAMS = ("verify_inputs",)
"""Run parameters that change neither the output nor the messages (left out of inputs_key)."""


def inputs_key(spec: RunSpec, model: str) -> str:
    """sha256 hex of what defines a run's work: where it reads, what it asks, which model answers, the
    options that change output or messages, and the sampling. ``model`` is the model identity (it
    stands for the checkpoint path, which is left out)."""
    params = {k: v for k, v in spec.params_dict().items() if k not in COSMETIC_PARAMS}
    doc = {"input_root": str(Path(spec.input_root).resolve()), "mission": spec.mission, "dataset": spec.dataset,
           "prompt_profile": spec.prompt_profile, "model": model, "sharding_mode": spec.sharding_mode,
           "params": params, "sampling": spec.sampling_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Plan:
    """A run as it would be recorded: discovery and sampling done, nothing written."""

    spec: RunSpec
    """With input_root set."""
    groups: list[Group]
    discovered_groups: int
    warnings: tuple[str, ...]

    @property
    def images(self) -> int:
        return sum(len(g.images) for g in self.groups)

    def by_label(self) -> dict[str, tuple[int, int]]:
        """label -> (groups, images), fail first like the output."""
        out: dict[str, tuple[int, int]] = {}
        for g in self.groups:
            n_groups, n_images = out.get(g.label, (0, 0))
            out[g.label] = (n_groups + 1, n_images + len(g.images))
        return out


class _Inputs:
    """The kept groups of a scan as the store's GroupInput (iterated once), counting images on the way."""

    def __init__(self, sampled: SampledStream) -> None:
        self.sampled = sampled
        self.images = 0

    def __iter__(self) -> Iterator[GroupInput]:
        for g in _kept_check(self.sampled):
            self.images += len(g.images)
            yield GroupInput(g.group_id, g.label, g.images)


def _sampled(spec: RunSpec, input_dir: Path, root_allowed: Callable[[Path], bool] | None) -> tuple[Scan, SampledStream]:
    """The scan (root found and allowed) and its sampled groups, not listed yet."""
    found = scan(Path(input_dir), spec.mission)
    if root_allowed is not None and not root_allowed(found.input_root):
        raise UserError(f"input root {found.input_root} is outside STAGE_A_INPUT_ROOTS: the workers would "
                        f"refuse every image (add it to STAGE_A_INPUT_ROOTS or use a folder below one)")
    return found, SampledStream(found.groups(), spec.pass_group_number, spec.fail_group_number, spec.sample_seed)


def _kept_check(sampled: SampledStream) -> Iterator[Group]:
    """The sampled groups; UserError after the last one when sampling kept none."""
    yield from sampled
    if not sampled.kept:
        raise UserError(
            f"sampling kept no groups of {sampled.found} found "
            f"(pass_group_number={sampled.caps['pass']}, fail_group_number={sampled.caps['fail']})"
        )


def plan_run(spec: RunSpec, input_dir: Path, root_allowed: Callable[[Path], bool] | None = None) -> Plan:
    """Scan ``input_dir`` for ``spec.mission`` and sample (what `--dry-run` shows; no store needed).

    ``root_allowed`` (a farm's STAGE_A_INPUT_ROOTS) refuses an input root the workers may not read."""
    found, sampled = _sampled(spec, input_dir, root_allowed)
    kept = list(_kept_check(sampled))
    return Plan(replace(spec, input_root=str(found.input_root)), kept, sampled.found, tuple(found.warnings))


def register_run(store: ResultStore, spec: RunSpec, input_dir: Path, farm: bool = False,
                 root_allowed: Callable[[Path], bool] | None = None, identity_cache: Path | None = None,
                 once: bool = False) -> Registered:
    """Scan ``input_dir`` for ``spec.mission``, sample, and record the run with every image pending.

    Groups stream from the scan through sampling into the store's one registering transaction: no
    list of the run's images is held, and a failed scan records nothing. ``root_allowed`` (a farm's
    STAGE_A_INPUT_ROOTS) refuses an input root the workers may not read before anything is recorded.
    ``identity_cache``: Checkpoint.open's digest cache (settings.cache_path / "identity"). ``once`` (a
    farm run): when an unfinished farm run has the same inputs, scan and record nothing and return
    that run (``existing``)."""
    found, sampled = _sampled(spec, input_dir, root_allowed)
    spec = replace(spec, input_root=str(found.input_root))
    checkpoint = Checkpoint.open(spec.checkpoint, identity_cache) if spec.checkpoint else None
    if checkpoint:  # recorded absolute: workers resolve nothing from their own cwd
        spec = replace(spec, checkpoint=str(checkpoint.path))
    model = checkpoint.identity if checkpoint else DEMO_MODEL
    base = checkpoint.base_identity if checkpoint else DEMO_MODEL
    key = inputs_key(spec, model)
    groups = _Inputs(sampled)
    if once:
        run_id, created = store.create_farm_run_once(spec, groups, key, model=model, base_model=base)
        if not created:
            info = store.get_run(run_id)
            return Registered(run_id, spec, info.n_groups, info.n_images, info.n_groups, tuple(found.warnings),
                              base, True)
    else:
        run_id = store.create_run(spec, groups, farm=farm, model=model, base_model=base, inputs_key=key)
    log.info("run %d: %d groups (%d found), %d images", run_id, sampled.kept, sampled.found, groups.images)
    return Registered(run_id, spec, sampled.kept, groups.images, sampled.found, tuple(found.warnings), base)
