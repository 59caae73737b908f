"""Turn an input tree into a recorded run: discover, sample, store groups and pending images."""

from __future__ import annotations

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
                 root_allowed: Callable[[Path], bool] | None = None, identity_cache: Path | None = None) -> Registered:
    """Scan ``input_dir`` for ``spec.mission``, sample, and record the run with every image pending.

    ``root_allowed`` (a farm's STAGE_A_INPUT_ROOTS) refuses an input root the workers may not read
    before anything is recorded. ``identity_cache``: Checkpoint.open's digest cache (settings.cache_path / "identity")."""
    plan = plan_run(spec, input_dir, root_allowed)
    spec, kept = plan.spec, plan.groups
    checkpoint = Checkpoint.open(spec.checkpoint, identity_cache) if spec.checkpoint else None
    if checkpoint:  # recorded absolute: workers resolve nothing from their own cwd
        spec = replace(spec, checkpoint=str(checkpoint.path))
    model = checkpoint.identity if checkpoint else DEMO_MODEL
    base = checkpoint.base_identity if checkpoint else DEMO_MODEL
    run_id = store.create_run(spec, [GroupInput(g.group_id, g.label, g.images) for g in kept], farm=farm,
                              model=model, base_model=base)
    n_images = sum(len(g.images) for g in kept)
    log.info("run %d: %d groups (%d found), %d images", run_id, len(kept), plan.discovered_groups, n_images)
    return Registered(run_id, spec, len(kept), n_images, plan.discovered_groups, plan.warnings, base)
