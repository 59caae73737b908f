"""Recovery queries: expired leases and pending images whose messages were lost, each won by one caller."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from stage_a.store.base import StoreBase, _by_run, _retrying, utcnow
from stage_a.store.models import LEASED, PENDING, ImageRow, Run
from stage_a.work import ImageKey, WorkItem


class RecoveryPart(StoreBase):
    def orphaned_pending(self, grace_seconds: float, limit: int = 100_000) -> list[WorkItem]:
        """Pending images of farm runs with no activity for ``grace_seconds`` (their messages were lost)."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        with Session(self.engine) as s:
            active = s.execute(
                select(ImageRow.run_id, func.max(ImageRow.updated_at), func.min(Run.created_at))
                .join(Run, Run.id == ImageRow.run_id)
                .where(Run.farm.is_(True), ImageRow.status == PENDING)
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
        """Atomically mark orphaned pending images as re-enqueued; returns only the ones this caller won.

        Every worker host runs a reclaimer, and all of them see the same orphans: without this, each
        re-published them (N hosts, N copies of every lost message). Like ``release`` for leases, a
        row is won only while it is still pending and idle since the grace cutoff.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=grace_seconds)
        by_key = {it.key: it for it in items}
        won: list[WorkItem] = []

        def op() -> None:
            won.clear()
            with self.engine.begin() as conn:
                for run_id, chunk in _by_run(list(by_key)):
                    rows = conn.execute(
                        update(ImageRow)
                        .where(ImageRow.run_id == run_id, ImageRow.status == PENDING,
                               tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk),
                               or_(ImageRow.updated_at.is_(None), ImageRow.updated_at <= cutoff))
                        .values(updated_at=now)
                        .returning(ImageRow.group_position, ImageRow.image_index)
                    ).all()
                    won.extend(by_key[ImageKey(run_id, p, i)] for p, i in rows)

        _retrying(op, "claiming orphaned images")
        return sorted(won, key=lambda it: it.key)

    def stale_leases(self, now: datetime | None = None, limit: int = 10_000) -> list[WorkItem]:
        """Leased images whose lease ran out: their worker died or lost them."""
        now = now or utcnow()
        with Session(self.engine) as s:
            rows = s.execute(
                select(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                .where(ImageRow.status == LEASED, ImageRow.lease_until < now)
                .order_by(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index)
                .limit(limit)
            ).all()
        return [WorkItem(ImageKey(r, p, i), path) for r, p, i, path in rows]

    def release(self, items: Sequence[WorkItem], lease_seconds: float) -> list[WorkItem]:
        """Atomically re-arm stale leases; returns only the items this caller won (no double re-enqueue).

        One UPDATE ... RETURNING per run and chunk, like claim_orphans: every reclaimer (one per
        worker host) sees the same expired leases, only the first to update a row re-sends it.
        """
        now = utcnow()
        by_key = {it.key: it for it in items}
        won: list[WorkItem] = []

        def op() -> None:
            won.clear()
            with self.engine.begin() as conn:
                for run_id, chunk in _by_run(list(by_key)):
                    rows = conn.execute(
                        update(ImageRow)
                        .where(ImageRow.run_id == run_id, ImageRow.status == LEASED, ImageRow.lease_until < now,
                               tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                        .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
                        .returning(ImageRow.group_position, ImageRow.image_index)
                    ).all()
                    won.extend(by_key[ImageKey(run_id, p, i)] for p, i in rows)

        _retrying(op, "releasing expired leases")
        return sorted(won, key=lambda it: it.key)
