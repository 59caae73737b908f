"""A run as the store records it: its groups on the way in, RunInfo on the way out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stage_a.checkpoint import route_of
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.store.models import Run


@dataclass(frozen=True)
class GroupInput:
    """A discovered group as the store needs it (producer.discovery.Group fits)."""

    group_id: str
    label: str
    images: tuple[str, ...]


@dataclass(frozen=True)
class RunInfo:
    id: int
    spec: RunSpec
    n_groups: int
    n_images: int
    created_at: datetime
    model: str | None = None
    """Fingerprint of the model the run must be served with (stage_a.fingerprint)."""
    farm: bool = False
    cancelled_at: datetime | None = None
    base_model: str | None = None
    """Identity of the base model whose workers serve the run (``model`` unless that is a LoRA adapter)."""

    @property
    def route(self) -> str | None:
        """The model identity that decides which workers receive the run's messages (None: a run recorded
        before identities were by content: the plain queue)."""
        return route_of(self.base_model or self.model)

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None


MAX_RUN_ID = 2**31 - 1


def check_run_id(run_id: int) -> int:
    """Run ids are positive database integers; 0 is not "the latest run"."""
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 < run_id <= MAX_RUN_ID:
        raise UserError(f"run ids start at 1 (and end at {MAX_RUN_ID}), got {run_id!r}")
    return run_id


def run_info(run: Run) -> RunInfo:
    params = dict(run.params)
    gen_fields = {k: params[k] for k in GenerationParams.__dataclass_fields__ if k in params}
    spec = RunSpec(
        mission=run.mission, dataset=run.dataset, input_root=run.input_root, checkpoint=run.checkpoint,
        prompt_profile=run.prompt_profile, sharding_mode=run.sharding_mode,
        batch_size=int(params.get("batch_size", 32)), max_pixels=int(params.get("max_pixels", 0)),
        generation=GenerationParams(**gen_fields),
        pass_group_number=run.sampling.get("pass_group_number"),
        fail_group_number=run.sampling.get("fail_group_number"),
        sample_seed=int(run.sampling.get("sample_seed", 42)),
        verify_inputs=bool(params.get("verify_inputs", False)),
        reuse=str(params.get("reuse", "auto")),
    )
    return RunInfo(id=run.id, spec=spec, n_groups=run.n_groups, n_images=run.n_images, created_at=run.created_at,
                   model=run.model, farm=run.farm, cancelled_at=run.cancelled_at,
                   base_model=run.base_model)
