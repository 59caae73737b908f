"""Runs: recording a run with its groups and pending images, and reading it back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.store.base import StoreBase, utcnow
from stage_a.store.bulk import bulk_insert
from stage_a.store.models import FAILED, PENDING, GroupRow, ImageRow, Run


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

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None


MAX_RUN_ID = 2**31 - 1


def check_run_id(run_id: int) -> int:
    """Run ids are positive database integers; 0 is not "the latest run"."""
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 < run_id <= MAX_RUN_ID:
        raise UserError(f"run ids start at 1 (and end at {MAX_RUN_ID}), got {run_id!r}")
    return run_id


class RunsPart(StoreBase):
    def create_run(self, spec: RunSpec, groups: Sequence[GroupInput], farm: bool = False,
                   model: str | None = None) -> int:
        """Record a run, its groups in output order and every image as pending, in one transaction.

        ``model`` is the fingerprint of the checkpoint the run must be served with."""
        n_images = sum(len(g.images) for g in groups)
        with Session(self.engine) as s, s.begin():
            run = Run(
                mission=spec.mission,
                dataset=spec.dataset,
                prompt_profile=spec.prompt_profile,
                checkpoint=spec.checkpoint,
                input_root=spec.input_root,
                sharding_mode=spec.sharding_mode,
                params=spec.params_dict(),
                sampling=spec.sampling_dict(),
                n_groups=len(groups),
                n_images=n_images,
                created_at=utcnow(),
                farm=farm,
                model=model,
            )
            s.add(run)
            s.flush()
            run_id = run.id
            conn = s.connection()
            group_rows = (
                {"run_id": run_id, "position": pos, "group_id": g.group_id, "label": g.label, "n_images": len(g.images)}
                for pos, g in enumerate(groups)
            )
            bulk_insert(conn, GroupRow.__table__, group_rows)
            image_rows = (
                {"run_id": run_id, "group_position": pos, "image_index": i, "rel_path": path,
                 "status": PENDING, "attempts": 0}
                for pos, g in enumerate(groups)
                for i, path in enumerate(g.images, start=1)
            )
            bulk_insert(conn, ImageRow.__table__, image_rows)
        return run_id

    def get_run(self, run_id: int) -> RunInfo:
        check_run_id(run_id)
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise UserError(f"no run {run_id} in {self.display_url}")
            return _run_info(run)

    def find_run(self, run_id: int) -> RunInfo | None:
        try:
            return self.get_run(run_id)
        except UserError:
            return None

    def latest_run(self, mission: str | None = None) -> RunInfo | None:
        with Session(self.engine) as s:
            q = select(Run).order_by(Run.id.desc()).limit(1)
            if mission:
                q = q.where(Run.mission == mission)
            run = s.scalars(q).first()
            return _run_info(run) if run else None

    def cancel_run(self, run_id: int) -> bool:
        """Mark a run cancelled (workers drop its messages); False when it already was. Idempotent."""
        check_run_id(run_id)
        with self.engine.begin() as conn:
            res = conn.execute(update(Run).where(Run.id == run_id, Run.cancelled_at.is_(None))
                               .values(cancelled_at=utcnow()))
            return bool(res.rowcount)

    def is_cancelled(self, run_id: int) -> bool:
        """Whether the run was cancelled (one indexed read; workers ask between model batches)."""
        with self.engine.connect() as conn:
            return conn.execute(select(Run.cancelled_at).where(Run.id == run_id)).scalar() is not None

    def reset_failed(self, run_id: int) -> int:
        """Put failed images back to pending (a --resume retries them)."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(ImageRow).where(ImageRow.run_id == run_id, ImageRow.status == FAILED)
                .values(status=PENDING, error=None, lease_until=None)
            )
            return int(res.rowcount or 0)


def _run_info(run: Run) -> RunInfo:
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
    )
    return RunInfo(id=run.id, spec=spec, n_groups=run.n_groups, n_images=run.n_images, created_at=run.created_at,
                   model=run.model, farm=run.farm, cancelled_at=run.cancelled_at)
