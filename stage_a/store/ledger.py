"""The work ledger: which images are pending, leased, done or failed, and the writes that move them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.orm import Session

from stage_a.store.base import StoreBase, _by_run, _no_nul, _retrying, utcnow
from stage_a.store.bulk import bulk_update_results
from stage_a.store.models import DONE, FAILED, LEASED, UNFINISHED, DeadLetter, ImageRow
from stage_a.work import ImageKey, ImageResult, WorkItem


@dataclass(frozen=True)
class LedgerEntry:
    status: str
    attempts: int
    """Deliveries so far (each lease counts one)."""
    rel_path: str
    """The image's path under the run's input root, as registered: the only path a worker reads."""


class LedgerPart(StoreBase):
    def unfinished_items(self, run_id: int) -> list[WorkItem]:
        """Images still pending or leased, in output order."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                .where(ImageRow.run_id == run_id, ImageRow.status.in_(UNFINISHED))
                .order_by(ImageRow.group_position, ImageRow.image_index)
            ).all()
        return [WorkItem(ImageKey(run_id, p, i), path) for p, i, path in rows]

    def _update_keys(self, keys: Sequence[ImageKey], statuses: Sequence[str], values: dict[str, Any]) -> None:
        """One UPDATE per run (in chunks) of the given images that are in one of ``statuses``."""
        with self.engine.begin() as conn:
            for run_id, chunk in _by_run(keys):
                conn.execute(
                    update(ImageRow)
                    .where(ImageRow.run_id == run_id, ImageRow.status.in_(statuses),
                           tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                    .values(**values)
                )

    def lease(self, keys: Sequence[ImageKey], worker: str, seconds: float) -> None:
        """Mark images as in flight on ``worker`` until now + seconds (stale leases get re-enqueued)."""
        if keys:
            until = utcnow() + timedelta(seconds=seconds)
            values = {"status": LEASED, "worker": worker, "lease_until": until,
                      "attempts": ImageRow.attempts + 1, "updated_at": utcnow()}
            _retrying(lambda: self._update_keys(keys, UNFINISHED, values), "lease")

    def renew(self, keys: Sequence[ImageKey], seconds: float) -> None:
        """Extend the leases of in-flight images (no attempt is counted). Best effort, no retry:
        the caller goes on without renewal rather than wait out an outage."""
        if keys:
            self._update_keys(keys, (LEASED,), {"lease_until": utcnow() + timedelta(seconds=seconds)})

    def record_results(self, results: Sequence[ImageResult], worker: str, model: str | None = None,
                       engine: str | None = None) -> None:
        """Store one model batch of results in one transaction; idempotent, a done row stays done.

        ``model`` (fingerprint) and ``engine`` say what produced them; None for rows failed
        without a model (rejected before any engine ran)."""
        if not results:
            return
        now = utcnow()
        rows = [
            {
                "k_run": r.key.run_id, "k_pos": r.key.group_position, "k_idx": r.key.image_index,
                "status": DONE if r.ok else FAILED,
                "summary": _no_nul(r.summary) if r.ok else None,
                "raw_text": _no_nul(r.raw_text),
                "error": None if r.ok else _no_nul(r.error or "empty summary"),
                "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "vision_tokens": r.vision_tokens, "preprocess_ms": r.preprocess_ms,
                "generate_ms": r.generate_ms, "worker": worker, "updated_at": now, "model": model, "engine": engine,
            }
            for r in results
        ]
        stmt = (
            update(ImageRow)
            .where(
                ImageRow.run_id == bindparam("k_run"),
                ImageRow.group_position == bindparam("k_pos"),
                ImageRow.image_index == bindparam("k_idx"),
                ImageRow.status != DONE,
            )
            .values(
                status=bindparam("status"), summary=bindparam("summary"), raw_text=bindparam("raw_text"),
                error=bindparam("error"), prompt_tokens=bindparam("prompt_tokens"),
                completion_tokens=bindparam("completion_tokens"), vision_tokens=bindparam("vision_tokens"),
                preprocess_ms=bindparam("preprocess_ms"), generate_ms=bindparam("generate_ms"),
                worker=bindparam("worker"), updated_at=bindparam("updated_at"), lease_until=None,
                model=bindparam("model"), engine=bindparam("engine"),
            )
        )

        def op() -> None:
            with self.engine.begin() as conn:
                if not bulk_update_results(conn, rows):
                    conn.execute(stmt.execution_options(synchronize_session=False), rows)

        _retrying(op, "storing results")

    def entries(self, keys: Sequence[ImageKey]) -> dict[ImageKey, LedgerEntry]:
        """The ledger entry (status, delivery attempts, stored path) of each key that exists."""
        out: dict[ImageKey, LedgerEntry] = {}
        with Session(self.engine) as s:
            for run_id, chunk in _by_run(keys):
                rows = s.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.status, ImageRow.attempts,
                           ImageRow.rel_path)
                    .where(ImageRow.run_id == run_id,
                           tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                ).all()
                for p, i, st, n, path in rows:
                    out[ImageKey(run_id, p, i)] = LedgerEntry(st, n, path)
        return out

    def dead_letter(self, reason: str, payload: str, worker: str | None, run_id: int | None = None) -> None:
        """Record a rejected message; ``run_id`` when the message named one that fits the column."""
        if run_id is not None and not 0 < run_id < 2**31:
            run_id = None

        def op() -> None:
            with Session(self.engine) as s, s.begin():
                s.add(DeadLetter(received_at=utcnow(), reason=_no_nul(reason[:2000]), payload=_no_nul(payload[:10_000]),
                                 worker=worker, run_id=run_id))

        _retrying(op, "dead-letter")
