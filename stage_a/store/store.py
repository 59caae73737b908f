"""The results store: the work ledger and its writes; reads are ``store.queries`` (queries.py).

The ledger says which images of a run are pending, leased, done or failed. Workers lease and record;
every worker host's reclaimer re-arms expired leases and re-enqueues pending images whose messages
were lost, each row won by one caller. Alembic (migrations/) owns the schema; bulk.py holds the
driver-level fast paths.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stage_a.config import RunSpec
from stage_a.errors import UserError
from stage_a.secrets import redact_url
from stage_a.store.bulk import RESULT_COLUMNS, bulk_insert, bulk_update_results, by_run, chunks
from stage_a.store.engine import make_engine, retrying, upgrade_schema
from stage_a.store.models import (
    DONE,
    FAILED,
    LEASED,
    PENDING,
    UNFINISHED,
    DeadLetter,
    GroupRow,
    ImageRow,
    ReclaimerRow,
    Run,
    RunCountsRow,
    StoreMeta,
    WorkerRow,
    utcnow,
)
from stage_a.store.queries import Queries
from stage_a.store.runs import GroupInput, RunInfo, check_run_id, run_info
from stage_a.work import ImageKey, ImageResult, WorkItem

WORKER_STATES = ("starting", "loading", "ready", "busy", "stopped")
_REGISTER_CHUNK = 50_000
"""Images registered per pair of COPYs (groups, then their images): bounds what registration holds."""
_INPUTS_LOCK_SPACE = 0x57A6E1
"""First key of PostgreSQL advisory locks on an inputs_key (the migration lock uses the one-key space)."""


def inputs_lock(inputs_key: str) -> tuple[int, int]:
    """The PostgreSQL advisory lock (two int4 keys) that registrations of ``inputs_key`` take in turn."""
    return _INPUTS_LOCK_SPACE, int(inputs_key[:8], 16) - 2**31


@dataclass(frozen=True)
class LedgerEntry:
    status: str
    attempts: int
    """Deliveries so far (each lease counts one)."""
    rel_path: str
    """The image's path under the run's input root, as registered: the only path a worker reads."""


@dataclass(frozen=True)
class Reusable:
    """A done summary another image may take (ResultStore.reusable)."""

    summary: str
    raw_text: str | None
    run_id: int
    """The run that generated it (a row that itself reused points at its source)."""
    model: str | None
    engine: str | None


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL (a byte-level model can emit one): U+FFFD on every backend,
    so SQLite and PostgreSQL runs store and export the same text."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


class ResultStore:
    """All database access of stage-a. One instance (one engine) per process: create it after fork.

    ``pool_size`` and ``sqlite_busy_timeout`` come from the entry point's Settings (make_engine).
    """

    def __init__(self, url: str, migrate: bool = True, *, pool_size: int = 5,
                 sqlite_busy_timeout: float = 30.0) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size, sqlite_busy_timeout)
        if migrate:
            upgrade_schema(self.engine)
        self.queries = Queries(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    @functools.cached_property
    def store_id(self) -> str:
        """This store's identity, written when its schema was created: messages name it."""
        with self.engine.connect() as c:
            value = c.execute(select(StoreMeta.value).where(StoreMeta.key == "store_id")).scalar()
        if not value:
            raise UserError(f"store {self.display_url} has no store_id (schema older than revision 0005?)")
        return str(value)

    # ---- runs -------------------------------------------------------------------------------

    def create_run(self, spec: RunSpec, groups: Iterable[GroupInput], farm: bool = False,
                   model: str | None = None, base_model: str | None = None, inputs_key: str | None = None) -> int:
        """Record a run, its groups in output order and every image as pending, in one transaction.

        ``model`` is the identity of the checkpoint the run must be served with, ``base_model`` that of
        its base (a LoRA adapter's; None: the model itself), ``inputs_key`` what defines its work."""
        with Session(self.engine) as s, s.begin():
            return self._insert_run(s, spec, groups, farm, model, base_model, inputs_key)

    def create_farm_run_once(self, spec: RunSpec, groups: Iterable[GroupInput], inputs_key: str,
                             model: str | None = None, base_model: str | None = None) -> tuple[int, bool]:
        """Record a farm run as create_run does, unless an unfinished, not cancelled farm run has the
        same ``inputs_key``: then (that run's id, False) and nothing is written; else (new id, True).

        On PostgreSQL a transaction-scoped advisory lock on the key makes registrations of one key take
        turns, so of two racing ones the second sees the first's run and records nothing."""
        with Session(self.engine) as s, s.begin():
            if self.engine.dialect.name == "postgresql":
                space, key = inputs_lock(inputs_key)
                s.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": space, "key": key})
            twin = s.scalars(self._unfinished_twin(inputs_key)).first()
            if twin is not None:
                return int(twin), False
            return self._insert_run(s, spec, groups, True, model, base_model, inputs_key), True

    @staticmethod
    def _unfinished_twin(inputs_key: str) -> Any:
        """The newest unfinished (pending or leased images left), not cancelled farm run with this key."""
        return (select(Run.id).join(RunCountsRow, RunCountsRow.run_id == Run.id)
                .where(Run.inputs_key == inputs_key, Run.farm.is_(True), Run.cancelled_at.is_(None),
                       (RunCountsRow.pending + RunCountsRow.leased) > 0)
                .order_by(Run.id.desc()).limit(1))

    @staticmethod
    def _insert_run(s: Session, spec: RunSpec, groups: Iterable[GroupInput], farm: bool, model: str | None,
                    base_model: str | None, inputs_key: str | None) -> int:
        """The run row, then its groups and images as they come, ``_REGISTER_CHUNK`` images at a time
        (COPY on PostgreSQL), then the run's counts: one transaction, so a registration that stops
        part-way (a scan error, a kill) leaves nothing."""
        run = Run(
            mission=spec.mission, dataset=spec.dataset, prompt_profile=spec.prompt_profile,
            checkpoint=spec.checkpoint, input_root=spec.input_root, sharding_mode=spec.sharding_mode,
            params=spec.params_dict(), sampling=spec.sampling_dict(), n_groups=0, n_images=0,
            created_at=utcnow(), farm=farm, model=model, base_model=base_model, inputs_key=inputs_key,
        )
        s.add(run)
        s.flush()
        run_id = run.id
        conn = s.connection()
        n_groups = n_images = 0
        chunk: list[GroupInput] = []
        size = 0
        for g in itertools.chain(groups, [None]):
            if g is not None:
                chunk.append(g)
                size += len(g.images)
                if size < _REGISTER_CHUNK:
                    continue
            bulk_insert(conn, GroupRow.__table__, (
                {"run_id": run_id, "position": pos, "group_id": g.group_id, "label": g.label,
                 "n_images": len(g.images)}
                for pos, g in enumerate(chunk, start=n_groups)
            ))
            bulk_insert(conn, ImageRow.__table__, (
                {"run_id": run_id, "group_position": pos, "image_index": i, "rel_path": path,
                 "status": PENDING, "attempts": 0}
                for pos, g in enumerate(chunk, start=n_groups)
                for i, path in enumerate(g.images, start=1)
            ))
            n_groups += len(chunk)
            n_images += size
            chunk, size = [], 0
        conn.execute(update(Run).where(Run.id == run_id).values(n_groups=n_groups, n_images=n_images))
        return run_id

    def get_run(self, run_id: int) -> RunInfo:
        check_run_id(run_id)
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise UserError(f"no run {run_id} in {self.display_url}")
            return run_info(run)

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
            return run_info(run) if run else None

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

    # ---- the ledger -------------------------------------------------------------------------

    def unfinished_items(self, run_id: int) -> list[WorkItem]:
        """Images still pending or leased, in output order."""
        return list(self.iter_unfinished_items(run_id))

    def iter_unfinished_items(self, run_id: int, page: int = 20_000) -> Iterator[WorkItem]:
        """``unfinished_items`` as a stream: keyset pages of ``page`` rows in key order, each page its
        own short read (no transaction or connection is held while the caller publishes)."""
        after = (-1, 0)
        key = tuple_(ImageRow.group_position, ImageRow.image_index)
        while True:
            with self.engine.connect() as c:
                if c.dialect.name == "postgresql":
                    # The primary key's order, whatever the statistics say: on a freshly registered
                    # (not yet analyzed) run the planner would sort the whole run for every page.
                    c.execute(text("SET LOCAL enable_sort = off"))
                rows = c.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                    .where(ImageRow.run_id == run_id, ImageRow.status.in_(UNFINISHED), key > tuple_(*after))
                    .order_by(ImageRow.group_position, ImageRow.image_index).limit(page)
                ).all()
            yield from [WorkItem(ImageKey(run_id, p, i), path) for p, i, path in rows]
            if len(rows) < page:
                return
            after = (rows[-1][0], rows[-1][1])

    def iter_unfinished_keys(self, run_id: int, page: int = 50_000) -> Iterator[ImageKey]:
        """The keys of ``iter_unfinished_items``, streamed in key order. A run none of whose images was
        touched yet (its counters: every image pending, as after registration) is read from its groups'
        sizes: a fraction of the rows, and none of the paths that a chunk message never carries."""
        counts = self.queries.counts(run_id, workers=False)
        if counts.leased or counts.done or counts.failed:
            yield from (it.key for it in self.iter_unfinished_items(run_id, page))
            return
        after = -1
        while True:
            with self.engine.connect() as c:
                rows = c.execute(
                    select(GroupRow.position, GroupRow.n_images)
                    .where(GroupRow.run_id == run_id, GroupRow.position > after)
                    .order_by(GroupRow.position).limit(page)
                ).all()
            for position, n in rows:
                yield from (ImageKey(run_id, position, i) for i in range(1, n + 1))
            if len(rows) < page:
                return
            after = rows[-1][0]

    def entries(self, keys: Sequence[ImageKey]) -> dict[ImageKey, LedgerEntry]:
        """The ledger entry (status, delivery attempts, stored path) of each key that exists."""
        out: dict[ImageKey, LedgerEntry] = {}
        with self.engine.connect() as c:
            for run_id, chunk in by_run(keys):
                rows = c.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.status, ImageRow.attempts,
                           ImageRow.rel_path)
                    .where(ImageRow.run_id == run_id, tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                ).all()
                for p, i, st, n, path in rows:
                    out[ImageKey(run_id, p, i)] = LedgerEntry(st, n, path)
        return out

    def _update_keys(self, keys: Sequence[ImageKey], statuses: Sequence[str], values: dict[str, Any]) -> None:
        """One UPDATE per run (in chunks) of the given images that are in one of ``statuses``."""
        with self.engine.begin() as conn:
            for run_id, chunk in by_run(keys):
                conn.execute(
                    update(ImageRow)
                    .where(ImageRow.run_id == run_id, ImageRow.status.in_(statuses),
                           tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                    .values(**values)
                )

    def lease(self, keys: Sequence[ImageKey], worker: str, seconds: float) -> None:
        """Mark images as in flight on ``worker`` until now + seconds (stale leases get re-enqueued)."""
        if keys:
            now = utcnow()
            values = {"status": LEASED, "worker": worker, "lease_until": now + timedelta(seconds=seconds),
                      "attempts": ImageRow.attempts + 1, "updated_at": now}
            retrying(lambda: self._update_keys(keys, UNFINISHED, values), "lease")

    def renew(self, keys: Sequence[ImageKey], seconds: float) -> None:
        """Extend the leases of in-flight images (no attempt is counted). Best effort, no retry:
        the caller goes on without renewal rather than wait out an outage."""
        if keys:
            self._update_keys(keys, (LEASED,), {"lease_until": utcnow() + timedelta(seconds=seconds)})

    def unlease(self, keys: Sequence[ImageKey]) -> None:
        """Put leased images back to pending without counting an attempt (a cancelled run's images
        that were leased but never run). Never touches done or failed rows."""
        if keys:
            values = {"status": PENDING, "lease_until": None, "attempts": ImageRow.attempts - 1}
            retrying(lambda: self._update_keys(keys, (LEASED,), values), "unlease")

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
                "generate_ms": r.generate_ms, "worker": worker, "updated_at": now,
                "model": r.model or model, "engine": r.engine or engine,
                "reuse_key": r.reuse_key if r.ok else None, "stat_key": r.stat_key if r.ok else None,
                "reused_from": r.reused_from if r.ok else None,
            }
            for r in results
        ]
        columns = RESULT_COLUMNS
        stmt = (
            update(ImageRow)
            .where(ImageRow.run_id == bindparam("k_run"), ImageRow.group_position == bindparam("k_pos"),
                   ImageRow.image_index == bindparam("k_idx"), ImageRow.status != DONE)
            .values(lease_until=None, **{c: bindparam(c) for c in columns})
        )

        def op() -> None:
            with self.engine.begin() as conn:
                if not bulk_update_results(conn, rows):
                    conn.execute(stmt.execution_options(synchronize_session=False), rows)

        retrying(op, "storing results")

    def reusable(self, column: str, keys: Collection[str]) -> dict[str, Reusable]:
        """Done summaries by ``column`` (``reuse_key`` or ``stat_key``, stage_a.reuse) for each key found."""
        col = {"reuse_key": ImageRow.reuse_key, "stat_key": ImageRow.stat_key}[column]
        out: dict[str, Reusable] = {}
        with self.engine.connect() as c:
            for chunk in chunks(sorted(set(keys)), 500):
                rows = c.execute(
                    select(col, ImageRow.summary, ImageRow.raw_text, ImageRow.run_id, ImageRow.reused_from,
                           ImageRow.model, ImageRow.engine)
                    .where(col.in_(chunk), ImageRow.status == DONE).order_by(ImageRow.run_id)
                ).all()
                for key, summary, raw, run_id, source, model, engine in rows:
                    if summary and key is not None and key not in out:
                        out[key] = Reusable(summary, raw, source if source is not None else run_id, model, engine)
        return out

    def dead_letter(self, reason: str, payload: str, worker: str | None, run_id: int | None = None) -> None:
        """Record a rejected message; ``run_id`` when the message named one that fits the column."""
        if run_id is not None and not 0 < run_id < 2**31:
            run_id = None

        def op() -> None:
            with self.engine.begin() as conn:
                conn.execute(insert(DeadLetter).values(
                    received_at=utcnow(), reason=_no_nul(reason[:2000]), payload=_no_nul(payload[:10_000]),
                    worker=worker, run_id=run_id))

        retrying(op, "dead-letter")

    # ---- recovery: expired leases and lost messages, each row won by one caller -------------

    def orphaned_pending(self, grace_seconds: float, limit: int = 100_000,
                         now: datetime | None = None, runs: Collection[int] | None = None) -> list[WorkItem]:
        """Pending images of farm runs (of ``runs`` only, when given) with no activity for ``grace_seconds``
        (their messages were lost).

        Cancelled runs are left alone: their pending images are never re-enqueued."""
        if runs is not None and not runs:
            return []
        cutoff = (now or utcnow()) - timedelta(seconds=grace_seconds)
        out: list[WorkItem] = []
        with self.engine.connect() as c:
            active = c.execute(  # farm runs with pending images, by their counters (not their rows)
                select(Run.id, Run.created_at)
                .join(RunCountsRow, RunCountsRow.run_id == Run.id)
                .where(Run.farm.is_(True), Run.cancelled_at.is_(None), RunCountsRow.pending > 0,
                       *([Run.id.in_(list(runs))] if runs is not None else []))
                .order_by(Run.id)
            ).all()
            for run_id, created in active:
                last = c.execute(select(func.max(ImageRow.updated_at))
                                 .where(ImageRow.run_id == run_id, ImageRow.updated_at.is_not(None))).scalar()
                if (last or created) > cutoff:
                    continue
                rows = c.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                    .where(ImageRow.run_id == run_id, ImageRow.status == PENDING)
                    .order_by(ImageRow.group_position, ImageRow.image_index).limit(limit - len(out))
                ).all()
                out += [WorkItem(ImageKey(run_id, p, i), path) for p, i, path in rows]
                if len(out) >= limit:
                    break
        return out

    @contextmanager
    def claiming_orphans(self, items: Sequence[WorkItem], grace_seconds: float,
                         now: datetime | None = None) -> Iterator[list[WorkItem]]:
        """Mark orphaned pending images as re-enqueued; yields only the ones this caller won (like
        ``releasing``: a row is won only while still pending and idle since the grace cutoff)."""
        now = now or utcnow()
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
        return self._leased_items(ImageRow.lease_until < (now or utcnow()), limit=limit)

    def _leased_items(self, *conditions: Any, limit: int) -> list[WorkItem]:
        """Leased images of runs not cancelled that meet ``conditions``, in key order."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path)
                .join(Run, Run.id == ImageRow.run_id)
                .where(ImageRow.status == LEASED, Run.cancelled_at.is_(None), *conditions)
                .order_by(ImageRow.run_id, ImageRow.group_position, ImageRow.image_index)
                .limit(limit)
            ).all()
        return [WorkItem(ImageKey(r, p, i), path) for r, p, i, path in rows]

    @contextmanager
    def releasing(self, items: Sequence[WorkItem], lease_seconds: float,
                  now: datetime | None = None) -> Iterator[list[WorkItem]]:
        """Re-arm stale leases; yields only the items this caller won: every host's reclaimer sees the
        same expired leases, and only the first to update a row re-sends it."""
        now = now or utcnow()
        with self._claiming(items, lambda run_id, chunk: (
            update(ImageRow)
            .where(ImageRow.run_id == run_id, ImageRow.status == LEASED, ImageRow.lease_until < now,
                   tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
            .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
        )) as won:
            yield won

    @staticmethod
    def _dead_workers(cutoff: datetime) -> Any:
        """Names of workers whose last heartbeat is older than ``cutoff`` or that say they stopped."""
        return select(WorkerRow.name).where(or_(WorkerRow.heartbeat_at < cutoff, WorkerRow.state == "stopped"))

    def dead_holder_leases(self, holder_timeout: float, now: datetime | None = None,
                           limit: int = 10_000) -> list[WorkItem]:
        """Leased images of farm runs whose holder is dead: its heartbeat is older than ``holder_timeout``
        seconds, or its row says stopped (cancelled runs excluded; a holder with no row is left to its lease)."""
        cutoff = (now or utcnow()) - timedelta(seconds=holder_timeout)
        return self._leased_items(Run.farm.is_(True), ImageRow.worker.in_(self._dead_workers(cutoff)), limit=limit)

    @contextmanager
    def releasing_dead_holders(self, items: Sequence[WorkItem], holder_timeout: float,
                               now: datetime | None = None) -> Iterator[list[WorkItem]]:
        """Put a dead holder's leased images back to pending (they are re-sent); yields only the rows this
        caller won: a row is won only while still leased by a worker that is still dead."""
        now = now or utcnow()
        dead = self._dead_workers(now - timedelta(seconds=holder_timeout))
        with self._claiming(items, lambda run_id, chunk: (
            update(ImageRow)
            .where(ImageRow.run_id == run_id, ImageRow.status == LEASED, ImageRow.worker.in_(dead),
                   tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
            .values(status=PENDING, lease_until=None, updated_at=now)
        )) as won:
            yield won

    @contextmanager
    def _claiming(self, items: Sequence[WorkItem],
                  statement: Callable[[int, list[tuple[int, int]]], Any]) -> Iterator[list[WorkItem]]:
        """Run ``statement`` (an UPDATE of one run's chunk of keys) over ``items`` in one transaction and
        yield the rows it updated; commit after the block, roll back if it raises. The block publishes the
        won images, so an image is recorded as re-enqueued only once its message is sent. The rows stay
        locked until the commit (PostgreSQL): another reclaimer's UPDATE waits, then no longer matches."""
        by_key = {it.key: it for it in items}
        with self.engine.connect() as conn, conn.begin():
            won: list[WorkItem] = []
            for run_id, chunk in by_run(list(by_key)):
                rows = conn.execute(
                    statement(run_id, chunk).returning(ImageRow.group_position, ImageRow.image_index)
                ).all()
                won.extend(by_key[ImageKey(run_id, p, i)] for p, i in rows)
            yield sorted(won, key=lambda it: it.key)

    # ---- reclaimer health (read by queries.reclaimer_beats) ----------------------------------

    def reclaimer_checked(self, host: str, problem: str | None, now: datetime | None = None) -> None:
        """Record a reclaimer pass of ``host``: ``problem`` None clears its failure, else it is kept with
        the time the failing began (the first failing pass since the last good one)."""
        now = now or utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(select(ReclaimerRow.failing_since).where(ReclaimerRow.host == host)).first()
            since = None if problem is None else (row[0] if row is not None and row[0] is not None else now)
            values = {"checked_at": now, "failing_since": since, "problem": _no_nul(problem)}
            if row is None:
                try:
                    with conn.begin_nested():  # another process of the same host may insert it first
                        conn.execute(insert(ReclaimerRow).values(host=host, **values))
                    return
                except IntegrityError:
                    pass
            conn.execute(update(ReclaimerRow).where(ReclaimerRow.host == host).values(**values))

    # ---- worker heartbeats (read by queries.worker_beats) -----------------------------------

    def heartbeat(self, name: str, state: str, *, model: str | None = None, engine: str | None = None,
                  device: str | None = None, pinned: bool | None = None, started: bool = False,
                  problem: str | None = None) -> None:
        """Upsert the worker's row with its state; fields left None keep their stored value.

        ``started`` (the first beat of a process) resets started_at and the per-process totals, so a
        name reused by a restarted process does not carry the old one's figures."""
        if state not in WORKER_STATES:
            raise ValueError(f"worker state must be one of {', '.join(WORKER_STATES)}, got {state!r}")
        now = utcnow()
        values: dict[str, Any] = {"state": state, "heartbeat_at": now}
        values.update((k, v) for k, v in (("model", model), ("engine", engine), ("device", device),
                                          ("pinned", pinned)) if v is not None)
        if problem is not None:
            values["problem"] = problem or None  # "" clears it
        if started:
            values.update(started_at=now, images_total=0, problem=None, run_id=None, last_batch_at=None, last_batch_images=None,
                          last_batch_seconds=None, images_per_s=None, tokens_per_s=None)
        self._upsert_worker(name, values, now)

    def record_batch(self, name: str, *, run_id: int, images: int, seconds: float, completion_tokens: int,
                     model: str | None = None, engine: str | None = None) -> None:
        """After a committed model batch: its size, time and rates, and the process's running total."""
        now = utcnow()
        values: dict[str, Any] = {
            "state": "busy", "heartbeat_at": now, "run_id": run_id, "last_batch_at": now,
            "last_batch_images": images, "last_batch_seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else None,
            "tokens_per_s": completion_tokens / seconds if seconds > 0 else None,
            "images_total": WorkerRow.images_total + images,
        }
        values.update((k, v) for k, v in (("model", model), ("engine", engine)) if v is not None)
        self._upsert_worker(name, values, now)

    def worker_problem(self, node: str, problem: str | None) -> None:
        """Set (or clear, None) the problem of every process row of worker node ``node`` (names ``node:pid``)."""
        def op() -> None:
            with self.engine.begin() as conn:
                conn.execute(update(WorkerRow).where(WorkerRow.name.startswith(f"{node}:", autoescape=True))
                             .values(problem=problem))

        retrying(op, "worker problem", attempts=3)

    def _upsert_worker(self, name: str, values: dict[str, Any], now: datetime) -> None:
        def op() -> None:
            with self.engine.begin() as conn:
                if conn.execute(update(WorkerRow).where(WorkerRow.name == name).values(**values)).rowcount:
                    return
                row = {"name": name, "started_at": now, "images_total": 0, **values}
                if not isinstance(row["images_total"], int):  # a first beat that is a batch
                    row["images_total"] = values.get("last_batch_images") or 0
                conn.execute(insert(WorkerRow).values(**row))

        retrying(op, "worker heartbeat", attempts=3)
