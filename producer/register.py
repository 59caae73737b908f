"""Turn an input tree into a recorded run: discover, sample, store groups and pending images."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from producer.discovery import Group, discover
from producer.sampling import sample_groups
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
    """An unfinished farm run with the same inputs existed: ``run_id`` is that run and nothing was recorded
    (``groups`` and ``images`` are what this registration would have recorded)."""


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


def plan_run(spec: RunSpec, input_dir: Path, root_allowed: Callable[[Path], bool] | None = None) -> Plan:
    """Scan ``input_dir`` for ``spec.mission`` and sample (what `--dry-run` shows; no store needed).

    ``root_allowed`` (a farm's STAGE_A_INPUT_ROOTS) refuses an input root the workers may not read."""
    found = discover(Path(input_dir), spec.mission)
    if root_allowed is not None and not root_allowed(found.input_root):
        raise UserError(f"input root {found.input_root} is outside STAGE_A_INPUT_ROOTS: the workers would "
                        f"refuse every image (add it to STAGE_A_INPUT_ROOTS or use a folder below one)")
    kept = sample_groups(found.groups, spec.pass_group_number, spec.fail_group_number, spec.sample_seed)
    if not kept:
        raise UserError(
            f"sampling kept no groups of {len(found.groups)} found "
            f"(pass_group_number={spec.pass_group_number}, fail_group_number={spec.fail_group_number})"
        )
    return Plan(replace(spec, input_root=str(found.input_root)), list(kept), len(found.groups), tuple(found.warnings))


def register_run(store: ResultStore, spec: RunSpec, input_dir: Path, farm: bool = False,
                 root_allowed: Callable[[Path], bool] | None = None, identity_cache: Path | None = None,
                 once: bool = False) -> Registered:
    """Scan ``input_dir`` for ``spec.mission``, sample, and record the run with every image pending.

    ``root_allowed`` (a farm's STAGE_A_INPUT_ROOTS) refuses an input root the workers may not read
    before anything is recorded. ``identity_cache``: Checkpoint.open's digest cache (settings.cache_path /
    "identity"). ``once`` (a farm run): when an unfinished farm run has the same inputs, record nothing
    and return that run (``existing``)."""
    plan = plan_run(spec, input_dir, root_allowed)
    spec, kept = plan.spec, plan.groups
    checkpoint = Checkpoint.open(spec.checkpoint, identity_cache) if spec.checkpoint else None
    if checkpoint:  # recorded absolute: workers resolve nothing from their own cwd
        spec = replace(spec, checkpoint=str(checkpoint.path))
    model = checkpoint.identity if checkpoint else DEMO_MODEL
    base = checkpoint.base_identity if checkpoint else DEMO_MODEL
    key = inputs_key(spec, model)
    groups = [GroupInput(g.group_id, g.label, g.images) for g in kept]
    n_images = sum(len(g.images) for g in kept)
    if once:
        run_id, created = store.create_farm_run_once(spec, groups, key, model=model, base_model=base)
        if not created:
            return Registered(run_id, spec, len(kept), n_images, plan.discovered_groups, plan.warnings, base, True)
    else:
        run_id = store.create_run(spec, groups, farm=farm, model=model, base_model=base, inputs_key=key)
    log.info("run %d: %d groups (%d found), %d images", run_id, len(kept), plan.discovered_groups, n_images)
    return Registered(run_id, spec, len(kept), n_images, plan.discovered_groups, plan.warnings, base)
