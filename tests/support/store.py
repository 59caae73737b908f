"""Reading and driving the store the way tests need to, beside the product's own API."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select

from stage_a.store import ResultStore
from stage_a.store.models import DeadLetter, ImageRow
from stage_a.work import WorkItem


@functools.cache
def store_id_of(db_url: str) -> str:
    """The store id of the database at ``db_url`` (what every message names), read once per URL."""
    store = ResultStore(db_url)
    try:
        return store.store_id
    finally:
        store.close()


def image_rows(store: ResultStore, run_id: int) -> list[dict[str, Any]]:
    """Every image row of a run, every column, in group order."""
    with store.engine.connect() as c:
        rows = c.execute(select(ImageRow.__table__).where(ImageRow.run_id == run_id)
                         .order_by(ImageRow.group_position, ImageRow.image_index))
        return [dict(r._mapping) for r in rows]


def dead_letters(store: ResultStore) -> list[tuple[str, str]]:
    """(reason, payload) of every dead letter, oldest first."""
    with store.engine.connect() as c:
        return [(r, p) for r, p in c.execute(select(DeadLetter.reason, DeadLetter.payload).order_by(DeadLetter.id))]


def claim_orphans(store: ResultStore, items: Sequence[WorkItem], grace_seconds: float,
                  now: datetime | None = None) -> list[WorkItem]:
    """``claiming_orphans`` with nothing to do before the commit."""
    with store.claiming_orphans(items, grace_seconds, now) as won:
        return won


def release(store: ResultStore, items: Sequence[WorkItem], lease_seconds: float) -> list[WorkItem]:
    """``releasing`` with nothing to do before the commit."""
    with store.releasing(items, lease_seconds) as won:
        return won


def age_run(store: ResultStore, run_id: int, seconds: float) -> None:
    """Move a run's history ``seconds`` into the past (PostgreSQL): its creation, its rows' times, and the
    counters' times and recent buckets, which the triggers only ever move forward."""
    from sqlalchemy import text

    shift = {"r": run_id, "s": seconds}
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET created_at = created_at - make_interval(secs => :s) WHERE id = :r"), shift)
        c.execute(text("UPDATE images SET updated_at = updated_at - make_interval(secs => :s) "
                       "WHERE run_id = :r AND updated_at IS NOT NULL"), shift)
        c.execute(text("UPDATE run_counts SET first_activity = first_activity - make_interval(secs => :s), "
                       "first_result = first_result - make_interval(secs => :s), "
                       "last_result = last_result - make_interval(secs => :s) WHERE run_id = :r"), shift)
        c.execute(text("UPDATE run_recent SET bucket = bucket - make_interval(secs => :s) WHERE run_id = :r"), shift)
