"""The results store: runs, their groups in output order, and one row per image."""

from __future__ import annotations

import itertools
import logging
import operator
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import bindparam, case, func, insert, or_, select, tuple_, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from stage_a.config import GenerationParams, RunSpec, redact_url
from stage_a.errors import UserError
from stage_a.store.engine import _first_line, make_engine, upgrade_schema
from stage_a.store.models import (
    DONE,
    FAILED,
    LEASED,
    PENDING,
    UNFINISHED,
    DeadLetter,
    GroupRow,
    ImageRow,
    Run,
)
from stage_a.store.views import ViewQueries
from stage_a.work import ImageKey, ImageResult, WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")
_INSERT_CHUNK = 5000


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


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


def _retrying(fn: Callable[[], T], what: str, attempts: int = 8, base_delay: float = 0.5) -> T:
    """Run a DB operation, retrying transient failures (server restart, SQLite lock) with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts or (isinstance(exc, DBAPIError) and not exc.connection_invalidated
                                       and not isinstance(exc, OperationalError)):
                raise
            delay = min(base_delay * 2 ** (attempt - 1), 10.0) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _first_line(exc), attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class ResultStore(ViewQueries):
    """All database access of stage-a. One instance (one engine) per process."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            upgrade_schema(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    # ---- runs -------------------------------------------------------------------------------

    def create_run(self, spec: RunSpec, groups: Sequence[GroupInput], farm: bool = False) -> int:
        """Record a run, its groups in output order and every image as pending, in one transaction."""
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
            )
            s.add(run)
            s.flush()
            run_id = run.id
            conn = s.connection()
            group_rows = (
                {"run_id": run_id, "position": pos, "group_id": g.group_id, "label": g.label, "n_images": len(g.images)}
                for pos, g in enumerate(groups)
            )
            _bulk_insert(conn, GroupRow.__table__, group_rows)
            image_rows = (
                {"run_id": run_id, "group_position": pos, "image_index": i, "rel_path": path,
                 "status": PENDING, "attempts": 0}
                for pos, g in enumerate(groups)
                for i, path in enumerate(g.images, start=1)
            )
            _bulk_insert(conn, ImageRow.__table__, image_rows)
        return run_id

    def get_run(self, run_id: int) -> RunInfo:
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

    # ---- work -------------------------------------------------------------------------------

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

    def record_results(self, results: Sequence[ImageResult], worker: str) -> None:
        """Store one model batch of results in one transaction; idempotent, a done row stays done."""
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
            )
        )

        def op() -> None:
            with self.engine.begin() as conn:
                if not _bulk_update_results(conn, rows):
                    conn.execute(stmt.execution_options(synchronize_session=False), rows)

        _retrying(op, "storing results")

    def attempts(self, keys: Sequence[ImageKey]) -> dict[ImageKey, tuple[str, int]]:
        """(status, delivery attempts) of each key that exists."""
        out: dict[ImageKey, tuple[str, int]] = {}
        with Session(self.engine) as s:
            for run_id, chunk in _by_run(keys):
                rows = s.execute(
                    select(ImageRow.group_position, ImageRow.image_index, ImageRow.status, ImageRow.attempts)
                    .where(ImageRow.run_id == run_id,
                           tuple_(ImageRow.group_position, ImageRow.image_index).in_(chunk))
                ).all()
                for p, i, st, n in rows:
                    out[ImageKey(run_id, p, i)] = (st, n)
        return out

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

    def touch(self, keys: Sequence[ImageKey]) -> None:
        """Mark re-enqueued pending images as active so the next check does not enqueue them again."""
        self._update_keys(keys, (PENDING,), {"updated_at": utcnow()})

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

    def reset_failed(self, run_id: int) -> int:
        """Put failed images back to pending (a --resume retries them)."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(ImageRow).where(ImageRow.run_id == run_id, ImageRow.status == FAILED)
                .values(status=PENDING, error=None, lease_until=None)
            )
            return int(res.rowcount or 0)

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
        """Atomically re-arm stale leases; returns only the items this caller won (no double re-enqueue)."""
        won: list[WorkItem] = []
        now = utcnow()
        with self.engine.begin() as conn:
            for it in items:
                res = conn.execute(
                    update(ImageRow)
                    .where(ImageRow.run_id == it.key.run_id, ImageRow.group_position == it.key.group_position,
                           ImageRow.image_index == it.key.image_index, ImageRow.status == LEASED,
                           ImageRow.lease_until < now)
                    .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
                )
                if res.rowcount:
                    won.append(it)
        return won

    def dead_letter(self, reason: str, payload: str, worker: str | None) -> None:
        def op() -> None:
            with Session(self.engine) as s, s.begin():
                s.add(DeadLetter(received_at=utcnow(), reason=reason[:2000], payload=payload[:10_000], worker=worker))

        _retrying(op, "dead-letter")

    def dead_letters(self) -> list[tuple[str, str]]:
        with Session(self.engine) as s:
            return [(d.reason, d.payload) for d in s.scalars(select(DeadLetter).order_by(DeadLetter.id))]

    # ---- reading ----------------------------------------------------------------------------

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


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL (a byte-level model can emit one): U+FFFD on every backend,
    so SQLite and PostgreSQL runs store and export the same text."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


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
    )
    return RunInfo(id=run.id, spec=spec, n_groups=run.n_groups, n_images=run.n_images, created_at=run.created_at)


# ---- bulk paths (speed only: same rows, same semantics as the SQLAlchemy statements) ---------------
# SQLAlchemy's executemany spends ~40 us of Python per row building parameters, and on psycopg it
# becomes one pipelined statement per row (~100 us): a 1M-image run took minutes to register and
# to store. These paths hand rows straight to the driver (SQLite executemany, PostgreSQL COPY).

_RESULT_COLUMNS = ("status", "summary", "raw_text", "error", "prompt_tokens", "completion_tokens",
                   "vision_tokens", "preprocess_ms", "generate_ms", "worker", "updated_at")
_PG_COPY_MIN_ROWS = 256  # below this (a worker's model batch) the plain executemany is as quick


def _psycopg_connection(conn: Any) -> Any | None:
    """The psycopg 3 connection under a SQLAlchemy connection (None for other drivers)."""
    raw = getattr(conn.connection, "driver_connection", None)
    return raw if type(raw).__module__.startswith("psycopg") and hasattr(raw, "cursor") else None


def _bind_processors(conn: Any, table: Any, columns: Sequence[str]) -> list[Any]:
    """Each column type's bind processor for this dialect (e.g. SQLite stores datetimes as text)."""
    return [table.c[name].type.dialect_impl(conn.dialect).bind_processor(conn.dialect) for name in columns]


def _bulk_insert(conn: Any, table: Any, rows: Iterator[dict[str, Any]]) -> None:
    """INSERT many rows of ``table`` in the current transaction: COPY on PostgreSQL, raw executemany on SQLite."""
    first = next(rows, None)
    if first is None:
        return
    rows = itertools.chain([first], rows)
    columns = list(first)
    prep = conn.dialect.identifier_preparer
    cols = ", ".join(prep.quote(c) for c in columns)
    pg = _psycopg_connection(conn) if conn.dialect.name == "postgresql" else None
    if pg is not None:
        with pg.cursor() as cur, cur.copy(f"COPY {prep.format_table(table)} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(tuple(row.values()))
        return
    if conn.dialect.name == "sqlite":
        procs = _bind_processors(conn, table, columns)
        sql = f"INSERT INTO {prep.format_table(table)} ({cols}) VALUES ({', '.join('?' * len(columns))})"
        for chunk in _chunks(rows, _INSERT_CHUNK):
            if any(procs):
                chunk = [tuple(p(v) if p else v for p, v in zip(procs, r.values(), strict=True)) for r in chunk]
            else:
                chunk = [tuple(r.values()) for r in chunk]
            conn.exec_driver_sql(sql, chunk)
        return
    for chunk in _chunks(rows, _INSERT_CHUNK):
        conn.execute(insert(table), chunk)


def _bulk_update_results(conn: Any, rows: list[dict[str, Any]]) -> bool:
    """record_results' UPDATE done by the driver; False when the caller must use the SQLAlchemy path.

    Same semantics: a row already done is never overwritten; lease_until is cleared.
    """
    table = ImageRow.__table__
    prep = conn.dialect.identifier_preparer
    name = prep.format_table(table)
    keys = [(r["k_run"], r["k_pos"], r["k_idx"]) for r in rows]
    if conn.dialect.name == "sqlite":
        convert = [(i, p) for i, p in enumerate(_bind_processors(conn, table, _RESULT_COLUMNS)) if p]
        sets = ", ".join(f"{prep.quote(c)} = ?" for c in _RESULT_COLUMNS)
        sql = (f"UPDATE {name} SET {sets}, lease_until = NULL "
               "WHERE run_id = ? AND group_position = ? AND image_index = ? AND status != ?")
        values = operator.itemgetter(*_RESULT_COLUMNS)
        memo: dict[Any, Any] = {}  # every row of a batch carries the same updated_at: convert it once
        params = []
        for r, k in zip(rows, keys, strict=True):
            v = values(r)
            if convert:
                v = list(v)
                for i, proc in convert:
                    x = v[i]
                    v[i] = memo[x] if x in memo else memo.setdefault(x, proc(x))
                v = tuple(v)
            params.append(v + k + (DONE,))
        conn.exec_driver_sql(sql, params)
        return True
    pg = _psycopg_connection(conn) if conn.dialect.name == "postgresql" else None
    if pg is None or len(rows) < _PG_COPY_MIN_ROWS or len(set(keys)) != len(keys):
        return False  # (duplicate keys: executemany's one-after-the-other semantics are kept)
    # COPY the batch into a session temp table (emptied at commit), then one joined UPDATE.
    cols = ", ".join(prep.quote(c) for c in _RESULT_COLUMNS)
    typed = ", ".join(f"{prep.quote(c)} {table.c[c].type.compile(dialect=conn.dialect)}" for c in _RESULT_COLUMNS)
    with pg.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_a_results_in "
            f"(k_run integer, k_pos integer, k_idx integer, {typed}) ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY stage_a_results_in (k_run, k_pos, k_idx, {cols}) FROM STDIN") as copy:
            values = operator.itemgetter(*_RESULT_COLUMNS)
            for r, k in zip(rows, keys, strict=True):
                copy.write_row(k + values(r))
        sets = ", ".join(f"{prep.quote(c)} = r.{prep.quote(c)}" for c in _RESULT_COLUMNS)
        # Primary-key lookups whatever the statistics say: on a freshly loaded run (not yet
        # analyzed) the planner hash-joins against a scan of the whole images table per batch.
        cur.execute("SET LOCAL enable_hashjoin = off")
        cur.execute("SET LOCAL enable_mergejoin = off")
        cur.execute(
            f"UPDATE {name} AS i SET {sets}, lease_until = NULL FROM stage_a_results_in AS r "
            "WHERE i.run_id = r.k_run AND i.group_position = r.k_pos AND i.image_index = r.k_idx "
            "AND i.status <> %s",
            (DONE,),
        )
    return True


def _chunks(it: Any, size: int) -> Iterator[list[Any]]:
    iterator = iter(it)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _by_run(keys: Sequence[ImageKey]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    for run_id, ks in itertools.groupby(sorted(keys), key=lambda k: k.run_id):
        pairs = [(k.group_position, k.image_index) for k in ks]
        for chunk in _chunks(pairs, 500):
            yield run_id, chunk

