"""Recovery queries: expired leases and pending images whose messages were lost, each won by one caller."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from stage_a.store.base import StoreBase, _by_run, utcnow
from stage_a.store.models import LEASED, PENDING, ImageRow, Run
from stage_a.work import ImageKey, WorkItem


class RecoveryPart(StoreBase):
    def orphaned_pending(self, grace_seconds: float, limit: int = 100_000) -> list[WorkItem]:
        """Pending images of farm runs with no activity for ``grace_seconds`` (their messages were lost).

        Cancelled runs are left alone: their pending images are never re-enqueued."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        with Session(self.engine) as s:
            active = s.execute(
                select(ImageRow.run_id, func.max(ImageRow.updated_at), func.min(Run.created_at))
                .join(Run, Run.id == ImageRow.run_id)
                .where(Run.farm.is_(True), Run.cancelled_at.is_(None), ImageRow.status == PENDING)
                .group_by(ImageRow.run_id)
            ).all()
            out: list[WorkItem] = []
            for run_id, _, created in active:
                last = s.execute(select(func.max(ImageRow.updated_at)).where(ImageRow.run_id == run_id)).scalar()
                if (last or created) > cutoff:
                    continue
                rows = s.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                    .where(ImageRow.run_id == run_id, ImageRow.status == PENDING)
                    .order_by(ImageRow.group_position, ImageRow.image_index).limit(limit - len(out))
                ).all()
                out += [WorkItem(ImageKey(run_id, p, i), path) for p, i, path in rows]
                if len(out) >= limit:
                    break
        return out

    def claim_orphans(self, items: Sequence[WorkItem], grace_seconds: float) -> list[WorkItem]:
        """``claiming_orphans`` with nothing to do before the commit."""
        with self.claiming_orphans(items, grace_seconds) as won:
            return won

    @contextmanager
    def claiming_orphans(self, items: Sequence[WorkItem], grace_seconds: float) -> Iterator[list[WorkItem]]:
        """Mark orphaned pending images as re-enqueued; yields only the ones this caller won.

        Every worker host runs a reclaimer, and all of them see the same orphans: without this, each
        re-published them (N hosts, N copies of every lost message). Like ``releasing`` for leases, a
        row is won only while it is still pending and idle since the grace cutoff. The claim commits
        when the block (publishing the won images) succeeds and is rolled back when it raises: an
        image whose message could not be sent stays an orphan for the next pass.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=grace_seconds)
        with self._claiming(items, lambda run_id, chunk: (
            update(ImageRow)
            .where(ImageRow.run_id == run_id, ImageRow.status == PENDING,
                   tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk),
                   or_(ImageRow.updated_at.is_(None), ImageRow.updated_at <= cutoff))
            .values(updated_at=now)
        )) as won:
            yield won

    def stale_leases(self, now: datetime | None = None, limit: int = 10_000) -> list[WorkItem]:
        """Leased images whose lease ran out: their worker died or lost them (cancelled runs excluded)."""
        now = now or utcnow()
        with Session(self.engine) as s:
            rows = s.execute(
                select(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                .join(Run, Run.id == ImageRow.run_id)
                .where(ImageRow.status == LEASED, ImageRow.lease_until < now, Run.cancelled_at.is_(None))
                .order_by(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index)
                .limit(limit)
            ).all()
        return [WorkItem(ImageKey(r, p, i), path) for r, p, i, path in rows]

    def release(self, items: Sequence[WorkItem], lease_seconds: float) -> list[WorkItem]:
        """``releasing`` with nothing to do before the commit."""
        with self.releasing(items, lease_seconds) as won:
            return won

    @contextmanager
    def releasing(self, items: Sequence[WorkItem], lease_seconds: float) -> Iterator[list[WorkItem]]:
        """Re-arm stale leases; yields only the items this caller won (no double re-enqueue).

        One UPDATE ... RETURNING per run and chunk, like claiming_orphans: every reclaimer (one per
        worker host) sees the same expired leases, only the first to update a row re-sends it. The
        transaction commits when the block (publishing the won images) succeeds and rolls back when
        it raises, so an image is never recorded as re-enqueued without its message being sent
        (that cost a whole extra lease of waiting when the broker was down).
        """
        now = utcnow()
        with self._claiming(items, lambda run_id, chunk: (
            update(ImageRow)
            .where(ImageRow.run_id == run_id, ImageRow.status == LEASED, ImageRow.lease_until < now,
                   tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
            .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
        )) as won:
            yield won

    @contextmanager
    def _claiming(self, items: Sequence[WorkItem],
                  statement: Callable[[int, list[tuple[int, int]]], Any]) -> Iterator[list[WorkItem]]:
        """Run ``statement`` (an UPDATE of one run's chunk of keys) over ``items`` in one transaction,
        yield the rows it updated, commit after the block, roll back if the block raises.

        The updated rows stay locked until then (PostgreSQL): a second reclaimer's UPDATE waits and,
        once this one commits, no longer matches them. The block holds the lock only as long as
        publishing takes; that is why it must not do anything slow besides.
        """
        by_key = {it.key: it for it in items}
        with self.engine.connect() as conn, conn.begin():
            won: list[WorkItem] = []
            for run_id, chunk in _by_run(list(by_key)):
                rows = conn.execute(
                    statement(run_id, chunk).returning(ImageRow.group_position, ImageRow.image_index)
                ).all()
                won.extend(by_key[ImageKey(run_id, p, i)] for p, i in rows)
            yield sorted(won, key=lambda it: it.key)
