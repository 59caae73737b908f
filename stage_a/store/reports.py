"""Reports: a run's counts and its groups in output order for export (streamed, flat memory)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from stage_a.store.base import StoreBase
from stage_a.store.models import DONE, FAILED, LEASED, PENDING, DeadLetter, GroupRow, ImageRow


@dataclass(frozen=True)
class RunCounts:
    pending: int
    leased: int
    done: int
    failed: int
    groups_total: int
    groups_done: int
    groups_failed: int
    first_update: datetime | None
    last_update: datetime | None
    workers: tuple[str, ...]

    @property
    def images_total(self) -> int:
        return self.pending + self.leased + self.done + self.failed

    @property
    def finished(self) -> bool:
        return self.pending == 0 and self.leased == 0


@dataclass(frozen=True)
class ExportImage:
    file_name: str
    status: str
    summary: str | None
    error: str | None


@dataclass(frozen=True)
class ExportGroup:
    position: int
    group_id: str
    label: str
    images: list[ExportImage]


class ReportsPart(StoreBase):
    def dead_letters(self) -> list[tuple[str, str]]:
        with Session(self.engine) as s:
            return [(d.reason, d.payload) for d in s.scalars(select(DeadLetter).order_by(DeadLetter.id))]

    def served_by(self, run_id: int) -> list[tuple[str, int]]:
        """(model fingerprint, images) of the run's done rows, most images first: who summarized it."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(ImageRow.model, func.count()).where(ImageRow.run_id == run_id, ImageRow.status == DONE)
                .group_by(ImageRow.model)
            ).all()
        return sorted(((m or "unknown", int(n)) for m, n in rows), key=lambda r: (-r[1], r[0]))

    def counts(self, run_id: int) -> RunCounts:
        with Session(self.engine) as s:
            by_status = dict(
                s.execute(
                    select(ImageRow.status, func.count()).where(ImageRow.run_id == run_id).group_by(ImageRow.status)
                ).all()
            )
            # One pass over the run's rows gives the group counts and the first/last result time
            # (it was two full scans: ~1 s each at 1M images, on every `status --watch` refresh).
            finished_at = case((ImageRow.status.in_((DONE, FAILED)), ImageRow.updated_at))
            per_group = (
                select(
                    ImageRow.group_position,
                    func.sum(case((ImageRow.status == DONE, 1), else_=0)).label("n_done"),
                    func.sum(case((ImageRow.status == FAILED, 1), else_=0)).label("n_failed"),
                    func.count().label("n"),
                    func.min(finished_at).label("first"),
                    func.max(finished_at).label("last"),
                )
                .where(ImageRow.run_id == run_id)
                .group_by(ImageRow.group_position)
                .subquery()
            )
            g_total, g_done, g_failed, first, last = s.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((per_group.c.n_done == per_group.c.n, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((per_group.c.n_failed > 0, 1), else_=0)), 0),
                    func.min(per_group.c.first),
                    func.max(per_group.c.last),
                )
            ).one()
            workers = tuple(
                w for (w,) in s.execute(
                    select(ImageRow.worker).where(ImageRow.run_id == run_id, ImageRow.worker.is_not(None))
                    .distinct().limit(100)
                ) if w
            )
        return RunCounts(
            pending=by_status.get(PENDING, 0), leased=by_status.get(LEASED, 0), done=by_status.get(DONE, 0),
            failed=by_status.get(FAILED, 0), groups_total=int(g_total), groups_done=int(g_done),
            groups_failed=int(g_failed), first_update=first, last_update=last, workers=tuple(sorted(workers)),
        )

    def iter_export_groups(self, run_id: int, batch_rows: int = 20_000) -> Iterator[ExportGroup]:
        """Groups in output order with their images, streamed by keyset pages (flat memory)."""
        last_pos = -1
        while True:
            # A Core connection, not an ORM Session: plain column rows skip the ORM's per-row
            # loading (a third of the store-side export time at 1M images).
            with self.engine.connect() as s:
                groups = s.execute(
                    select(GroupRow.position, GroupRow.group_id, GroupRow.label)
                    .where(GroupRow.run_id == run_id, GroupRow.position > last_pos)
                    .order_by(GroupRow.position)
                    .limit(max(1, batch_rows // 5))
                ).all()
                if not groups:
                    return
                lo, hi = groups[0][0], groups[-1][0]
                images = s.execute(
                    select(ImageRow.group_position, ImageRow.rel_path, ImageRow.status, ImageRow.summary,
                           ImageRow.error)
                    .where(ImageRow.run_id == run_id, ImageRow.group_position.between(lo, hi))
                    .order_by(ImageRow.group_position, ImageRow.image_index)
                ).all()
            by_pos = {pos: list(rows) for pos, rows in itertools.groupby(images, key=lambda r: r[0])}
            for pos, gid, label in groups:
                yield ExportGroup(
                    position=pos, group_id=gid, label=label,
                    images=[ExportImage(path.rsplit("/", 1)[-1], st, summ, err)
                            for _, path, st, summ, err in by_pos.get(pos, [])],
                )
            last_pos = hi

    def image_rows(self, run_id: int) -> list[dict[str, Any]]:
        """Every image row of a run (tests and debugging; not for big runs)."""
        with Session(self.engine) as s:
            rows = s.scalars(
                select(ImageRow).where(ImageRow.run_id == run_id)
                .order_by(ImageRow.group_position, ImageRow.image_index)
            ).all()
            return [{c.name: getattr(r, c.name) for c in ImageRow.__table__.columns} for r in rows]
