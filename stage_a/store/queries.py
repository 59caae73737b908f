"""Read-only queries of the results store: a run's counts, its pages, the operator views.

A view of one run reads its counters (run_counts and its neighbours, kept by triggers) and bounded
queries: a page of groups by keyset on their position, with an index for each filter (failed,
无关图片, label, and on PostgreSQL a trigram index for text search); the first failures; leases of
dead workers only. None of them aggregates a run's images, so they cost the same at ten million.
``iter_export_groups`` streams every group for an export.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Engine, and_, func, or_, select

from stage_a.checkpoint import route_of
from stage_a.store.bulk import fetch_rows
from stage_a.store.models import (
    DONE,
    FAILED,
    LEASED,
    PENDING,
    DeadLetter,
    GroupRow,
    ImageRow,
    ReclaimerRow,
    Run,
    RunCountsRow,
    RunModelRow,
    RunRecentRow,
    RunWorkerRow,
    WorkerRow,
)
from stage_a.store.search import RareWords, index_conditions, like_pattern, rare_words, text_match

IRRELEVANT = "无关图片"
"""The whole cleaned summary of an irrelevant image (SPEC section 5)."""
FAILURE_SAMPLE = 1_000
"""Failed rows (the first in output order) whose errors a report classifies."""
SEARCH_WINDOW = 2_500
"""Groups after a page's start that a text search reads in order before it asks the trigram index."""


@dataclass(frozen=True)
class ModelShare:
    """Images of a run finished by one (model, engine) pair."""

    model: str | None
    engine: str | None
    images: int


@dataclass(frozen=True)
class RunCounts:
    """Where a run's images and groups stand, read in one pass over its rows."""

    pending: int
    leased: int
    done: int
    failed: int
    groups_total: int
    groups_done: int
    """Groups whose every image is done."""
    groups_failed: int
    """Groups with at least one failed image."""
    first_update: datetime | None
    """Earliest result (done or failed)."""
    last_update: datetime | None
    workers: tuple[str, ...]
    """Worker names found on the run's rows (who leased or wrote them; at most 100)."""
    first_activity: datetime | None
    """Earliest updated_at of any row (a lease, or the first result)."""
    finished_since: int
    """Images finished (done or failed) from ``recent_from`` on (0 without a ``since``)."""
    preprocess_ms_mean: float | None
    generate_ms_mean: float | None
    completion_tokens: int
    generate_ms_with_tokens: float
    """Sum of generate_ms over the rows that have completion_tokens (tokens/s = tokens / this)."""
    models: tuple[ModelShare, ...]
    """Who finished the done images, most images first."""
    reused: int = 0
    """Done images whose summary was taken from an earlier run instead of generated."""
    recent_from: datetime | None = None
    """Where ``finished_since`` really starts: the caller's ``since`` rounded down to its 10-second bucket."""

    @property
    def images_total(self) -> int:
        return self.pending + self.leased + self.done + self.failed

    @property
    def finished(self) -> bool:
        return self.pending == 0 and self.leased == 0


@dataclass(frozen=True)
class RunRow:
    """One run as recorded (no image counts)."""

    id: int
    mission: str
    dataset: str
    checkpoint: str
    model: str | None
    input_root: str
    sharding_mode: str
    farm: bool
    n_groups: int
    n_images: int
    created_at: datetime
    cancelled_at: datetime | None
    params: dict[str, Any]
    base_model: str | None = None

    @property
    def route(self) -> str | None:
        """The base model identity whose workers serve the run (None: recorded before content identities)."""
        return route_of(self.base_model or self.model)


@dataclass(frozen=True)
class WorkerBeat:
    """One worker process's last heartbeat (the `workers` table), as read at some time ``now``."""

    name: str
    model: str | None
    pinned: bool | None
    """Serves only its STAGE_A_CHECKPOINT model; False: loads each run's model; None: not recorded."""
    engine: str | None
    device: str | None
    state: str
    """starting, loading, ready, busy or stopped; "offline" when the last beat is too old."""
    started_at: datetime
    heartbeat_at: datetime
    run_id: int | None
    last_batch_at: datetime | None
    last_batch_images: int | None
    last_batch_seconds: float | None
    images_per_s: float | None
    tokens_per_s: float | None
    images_total: int
    heartbeat_age_s: float
    online: bool
    """A fresh heartbeat and not stopped."""
    problem: str | None = None
    """Why it cannot serve something it was asked to (e.g. the model at a run's path differs here)."""


@dataclass(frozen=True)
class RouteWork:
    """An unfinished farm run by its route: the base model, and the run's checkpoint path and identity (a
    worker opens the path to check it holds that model)."""

    route: str
    run_id: int
    checkpoint: str
    model: str | None


@dataclass(frozen=True)
class DeadHolder:
    """Images of a run leased by a worker that stopped beating (or says stopped): the reclaimers re-send them."""

    worker: str
    images: int
    heartbeat_at: datetime
    """Its last heartbeat: the images have sat with a dead holder since then."""
    state: str


@dataclass(frozen=True)
class ReclaimerBeat:
    """One host's reclaimer (the `reclaimers` table): its last pass, and since when and why it fails."""

    host: str
    checked_at: datetime
    failing_since: datetime | None
    problem: str | None


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    received_at: datetime
    run_id: int | None
    worker: str | None
    reason: str
    payload: str


class ExportImage(NamedTuple):
    """One image as an export writes it (a tuple: an export makes one per image, ten million per run)."""

    file_name: str
    status: str
    summary: str | None
    error: str | None
    image_index: int


class ExportGroup(NamedTuple):
    position: int
    group_id: str
    label: str
    images: list[ExportImage]


@dataclass(frozen=True)
class PageImage:
    group_position: int
    image_index: int
    rel_path: str
    status: str
    summary: str | None
    raw_text: str | None
    error: str | None
    worker: str | None
    preprocess_ms: float | None
    generate_ms: float | None
    completion_tokens: int | None

    @property
    def file_name(self) -> str:
        return self.rel_path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PageGroup:
    position: int
    group_id: str
    label: str
    n_images: int
    images: list[PageImage]


@dataclass(frozen=True)
class ImageFilter:
    """Which images a run page shows; empty = all."""

    label: str | None = None
    failed: bool = False
    irrelevant: bool = False
    text: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.label or self.failed or self.irrelevant or self.text)


_PAGE_COLUMNS = (ImageRow.group_position, ImageRow.image_index, ImageRow.rel_path, ImageRow.status,
                 ImageRow.summary, ImageRow.raw_text, ImageRow.error, ImageRow.worker, ImageRow.preprocess_ms,
                 ImageRow.generate_ms, ImageRow.completion_tokens)
_GROUP_JOIN = and_(GroupRow.run_id == ImageRow.run_id, GroupRow.position == ImageRow.group_position)


class Queries:
    """Read-only queries; ``store.queries`` of a ResultStore."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- runs -------------------------------------------------------------------------------

    def run_row(self, run_id: int) -> RunRow | None:
        rows = self.run_rows(1, [run_id])
        return rows[0] if rows else None

    def run_rows(self, limit: int = 100, ids: Sequence[int] | None = None) -> list[RunRow]:
        """Runs newest first (or the given ids)."""
        q = select(Run).order_by(Run.id.desc()).limit(limit)
        if ids is not None:
            q = q.where(Run.id.in_(list(ids)))
        with self.engine.connect() as c:
            return [RunRow(**{k: r._mapping[k] for k in RunRow.__dataclass_fields__}) for r in c.execute(q)]

    def run_ids(self) -> list[int]:
        with self.engine.connect() as c:
            return [int(i) for (i,) in c.execute(select(Run.id).order_by(Run.id))]

    def recent_run_ids(self, limit: int) -> list[int]:
        """The newest ``limit`` run ids, oldest first."""
        with self.engine.connect() as c:
            return sorted(int(i) for (i,) in c.execute(select(Run.id).order_by(Run.id.desc()).limit(limit)))

    def unfinished_run_ids(self) -> list[int]:
        """Runs not cancelled with images pending or leased, oldest first (from the run counters)."""
        with self.engine.connect() as c:
            return [int(i) for (i,) in c.execute(
                select(Run.id).join(RunCountsRow, RunCountsRow.run_id == Run.id)
                .where(Run.cancelled_at.is_(None), _unfinished()).order_by(Run.id))]

    # ---- counts -----------------------------------------------------------------------------

    def status_counts(self, run_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """{run: {status: images}} for many runs (one read of their counters)."""
        out: dict[int, dict[str, int]] = {r: {} for r in run_ids}
        if not run_ids:
            return out
        with self.engine.connect() as c:
            rows = c.execute(select(RunCountsRow.run_id, RunCountsRow.pending, RunCountsRow.leased, RunCountsRow.done,
                                    RunCountsRow.failed).where(RunCountsRow.run_id.in_(list(run_ids))))
            for run_id, *ns in rows:
                out[int(run_id)] = {st: int(n) for st, n in zip((PENDING, LEASED, DONE, FAILED), ns, strict=True) if n}
        return out

    def counts(self, run_id: int, since: datetime | None = None, workers: bool = True) -> RunCounts:
        """The run's counts (images by status, groups, first/last times, images finished after ``since``,
        per-stage means, who served it; ``workers``: the worker names on its rows), read from the counters
        the images triggers keep (revision 0006): a few primary-key reads whatever the run's size.
        ``since`` is rounded down to the 10-second bucket it falls in."""
        with self.engine.connect() as c:
            n_groups = c.execute(select(Run.n_groups).where(Run.id == run_id)).scalar() or 0
            rc: Any = c.execute(select(RunCountsRow.__table__).where(RunCountsRow.run_id == run_id)).first()
            since_n, bucket = 0, None
            if since is not None:
                bucket = since.replace(second=since.second - since.second % 10, microsecond=0)
                since_n = int(c.execute(select(func.sum(RunRecentRow.finished))
                                        .where(RunRecentRow.run_id == run_id, RunRecentRow.bucket >= bucket)).scalar() or 0)
            models = c.execute(select(RunModelRow.model, RunModelRow.engine, RunModelRow.images)
                               .where(RunModelRow.run_id == run_id, RunModelRow.images > 0)).all()
            names = c.execute(select(RunWorkerRow.worker).where(RunWorkerRow.run_id == run_id)
                              .order_by(RunWorkerRow.worker).limit(100)).scalars().all() if workers else []
        if rc is None:  # no such run, or one of no groups
            rc = RunCountsRow(run_id=run_id, pending=0, leased=0, done=0, failed=0, reused=0, groups_done=0,
                              groups_failed=0, preprocess_n=0, generate_n=0, completion_tokens=0, prompt_tokens=0,
                              preprocess_ms_sum=0.0, generate_ms_sum=0.0, generate_ms_with_tokens=0.0)
        shares = sorted(((m or None, e or None, int(n)) for m, e, n in models), key=lambda r: (-r[2], r[0] or "", r[1] or ""))
        return RunCounts(
            pending=int(rc.pending), leased=int(rc.leased), done=int(rc.done), failed=int(rc.failed),
            groups_total=int(n_groups), groups_done=int(rc.groups_done), groups_failed=int(rc.groups_failed),
            first_update=rc.first_result, last_update=rc.last_result, workers=tuple(names),
            first_activity=rc.first_activity, finished_since=since_n,
            preprocess_ms_mean=rc.preprocess_ms_sum / rc.preprocess_n if rc.preprocess_n else None,
            generate_ms_mean=rc.generate_ms_sum / rc.generate_n if rc.generate_n else None,
            completion_tokens=int(rc.completion_tokens), generate_ms_with_tokens=float(rc.generate_ms_with_tokens),
            models=tuple(ModelShare(m, e, n) for m, e, n in shares), reused=int(rc.reused), recent_from=bucket,
        )

    def reuse_sources(self, run_id: int, limit: int = 20, rows: int = 10_000) -> list[tuple[int, int]]:
        """(run that generated them, images) among the run's first ``rows`` reused rows found (partial index
        ix_images_reused_from), most images first: a bounded read; their sum says how many were looked at."""
        n = func.count()
        sample = (select(ImageRow.reused_from).where(ImageRow.run_id == run_id, ImageRow.reused_from.is_not(None),
                                                     ImageRow.status == DONE).limit(rows).subquery())
        with self.engine.connect() as c:
            found = c.execute(select(sample.c.reused_from, n).group_by(sample.c.reused_from)
                              .order_by(n.desc(), sample.c.reused_from).limit(limit)).all()
        return [(int(r or 0), int(k)) for r, k in found]

    def failure_texts(self, run_id: int, rows: int = FAILURE_SAMPLE) -> list[tuple[str | None, int]]:
        """(error text, images) of the run's first ``rows`` failed rows in output order (index
        ix_images_failed), most common first: their sum is min(rows, failed images)."""
        first = (select(ImageRow.error).where(ImageRow.run_id == run_id, ImageRow.status == FAILED)
                 .order_by(ImageRow.group_position, ImageRow.image_index).limit(rows).subquery())
        n = func.count()
        with self.engine.connect() as c:
            found = c.execute(select(first.c.error, n).group_by(first.c.error).order_by(n.desc())).all()
        return [(e, int(k)) for e, k in found]

    def served_by(self, run_id: int) -> list[tuple[str, int]]:
        """(model fingerprint, images) of the run's done rows, most images first: who summarized it."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(RunModelRow.model, func.sum(RunModelRow.images))
                .where(RunModelRow.run_id == run_id, RunModelRow.images > 0).group_by(RunModelRow.model)
            ).all()
        return sorted(((m or "unknown", int(n)) for m, n in rows), key=lambda r: (-r[1], r[0]))

    # ---- workers and dead letters -----------------------------------------------------------

    def worker_beats(self, now: datetime | None = None, timeout: float = math.inf) -> list[WorkerBeat]:
        """Every worker's last heartbeat by name, read at ``now``: a beat older than ``timeout`` seconds
        is offline (``now`` None: the heartbeats' own times, all of them fresh)."""
        with self.engine.connect() as c:
            rows = c.execute(select(WorkerRow).order_by(WorkerRow.name)).all()
        out = []
        for r in rows:
            row = {k: r._mapping[k] for k in WorkerBeat.__dataclass_fields__ if k in r._mapping}
            age = max(0.0, (now - r.heartbeat_at).total_seconds()) if now else 0.0
            online = age <= timeout and r.state != "stopped"
            if not online and r.state != "stopped":
                row["state"] = "offline"
            out.append(WorkerBeat(**row, heartbeat_age_s=age, online=online))
        return out

    def routes_with_work(self) -> list[RouteWork]:
        """Every unfinished, uncancelled farm run with a route (its base model), newest first: a worker may
        hold the checkpoints of some runs of a model and not of others."""
        route = func.coalesce(Run.base_model, Run.model)
        with self.engine.connect() as c:
            rows = c.execute(
                select(route, Run.id, Run.checkpoint, Run.model).join(RunCountsRow, RunCountsRow.run_id == Run.id)
                .where(Run.farm.is_(True), Run.cancelled_at.is_(None), route.is_not(None), _unfinished())
                .order_by(Run.id.desc())
            ).all()
        return [RouteWork(r, run_id, checkpoint, model) for r, run_id, checkpoint, model in rows if route_of(r)]

    def dead_holders(self, run_id: int, cutoff: datetime) -> list[DeadHolder]:
        """The run's leased images by holder, for holders whose last heartbeat is before ``cutoff`` or that
        say stopped (oldest heartbeat first). The run's leases are counted only when such a worker exists."""
        with self.engine.connect() as c:
            dead = c.execute(select(WorkerRow.name, WorkerRow.heartbeat_at, WorkerRow.state)
                             .where(or_(WorkerRow.heartbeat_at < cutoff, WorkerRow.state == "stopped"))).all()
            if not dead:
                return []
            beat = {str(name): (at, st) for name, at, st in dead}
            rows = c.execute(
                select(ImageRow.worker, func.count())
                .where(ImageRow.run_id == run_id, ImageRow.status == LEASED, ImageRow.worker.in_(list(beat)))
                .group_by(ImageRow.worker)
            ).all()
        out = [DeadHolder(str(w), int(n), *beat[str(w)]) for w, n in rows]
        return sorted(out, key=lambda d: (d.heartbeat_at, d.worker))

    def reclaimer_beats(self) -> list[ReclaimerBeat]:
        """Every host's reclaimer row, by host."""
        with self.engine.connect() as c:
            rows = c.execute(select(ReclaimerRow.host, ReclaimerRow.checked_at, ReclaimerRow.failing_since,
                                    ReclaimerRow.problem).order_by(ReclaimerRow.host)).all()
            return [ReclaimerBeat(h, at, since, problem) for h, at, since, problem in rows]

    def finished_by_mission_model(self) -> dict[tuple[str, str, str], int]:
        """{(mission, base model or "", done|failed): images} over every run: the farm-wide totals that
        /metrics exports as counters (one grouped read of the run counters)."""
        route = func.coalesce(Run.base_model, Run.model, "")
        with self.engine.connect() as c:
            rows = c.execute(select(Run.mission, route, func.sum(RunCountsRow.done), func.sum(RunCountsRow.failed))
                             .join(RunCountsRow, RunCountsRow.run_id == Run.id).group_by(Run.mission, route))
            out: dict[tuple[str, str, str], int] = {}
            for m, r, done, failed in rows:
                for status, n in ((DONE, done), (FAILED, failed)):
                    if n:
                        out[(str(m), str(r), status)] = int(n)
            return out

    def dead_letter_counts(self, run_ids: Sequence[int] | None = None) -> dict[int | None, int]:
        """{run (None: unknown): dead letters}, of every run or only of ``run_ids`` (index on run_id)."""
        q = select(DeadLetter.run_id, func.count()).group_by(DeadLetter.run_id)
        if run_ids is not None:
            if not run_ids:
                return {}
            q = q.where(DeadLetter.run_id.in_(list(run_ids)))
        with self.engine.connect() as c:
            return {(int(r) if r is not None else None): int(n) for r, n in c.execute(q)}

    def dead_letter_rows(self, run_id: int | None = None, limit: int = 1000) -> list[DeadLetterRow]:
        """Newest first; only the run's when ``run_id`` is given."""
        q = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
        if run_id is not None:
            q = q.where(DeadLetter.run_id == run_id)
        with self.engine.connect() as c:
            return [DeadLetterRow(r.id, r.received_at, r.run_id, r.worker, r.reason, r.payload) for r in c.execute(q)]

    # ---- pages of a run ---------------------------------------------------------------------

    def iter_export_groups(self, run_id: int, batch_rows: int = 20_000, first: int = 0,
                           last: int | None = None) -> Iterator[ExportGroup]:
        """Groups in output order (positions ``first``..``last``, default all) with their images, streamed
        by keyset pages (flat memory: two pages). The next page is read in a thread while the caller works
        through this one: the database's time and the caller's encoding overlap."""
        limit = max(1, batch_rows // 5)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-a-export-read") as pool:
            pending = pool.submit(self._export_page, run_id, first - 1, limit, last)
            while True:
                groups, images = pending.result()
                if not groups:
                    return
                if len(groups) == limit:
                    pending = pool.submit(self._export_page, run_id, groups[-1][0], limit, last)
                else:
                    pending = _no_more_pages()
                by_pos = {pos: list(rows) for pos, rows in itertools.groupby(images, key=lambda r: r[0])}
                for pos, gid, label in groups:
                    yield ExportGroup(pos, gid, label, [ExportImage(path.rsplit("/", 1)[-1], st, summ, err, idx)
                                                        for _, path, st, summ, err, idx in by_pos.get(pos, [])])

    def _export_page(self, run_id: int, after: int, limit: int, last: int | None) -> tuple[list[Any], list[Any]]:
        """Up to ``limit`` groups after position ``after`` (up to ``last``) and their images, in output order."""
        upto = [GroupRow.position <= last] if last is not None else []
        with self.engine.connect() as c:
            groups = fetch_rows(c, select(GroupRow.position, GroupRow.group_id, GroupRow.label)
                                .where(GroupRow.run_id == run_id, GroupRow.position > after, *upto)
                                .order_by(GroupRow.position).limit(limit))
            if not groups:
                return [], []
            images = fetch_rows(c, select(ImageRow.group_position, ImageRow.rel_path, ImageRow.status,
                                          ImageRow.summary, ImageRow.error, ImageRow.image_index)
                                .where(ImageRow.run_id == run_id,
                                       ImageRow.group_position.between(groups[0][0], groups[-1][0]))
                                .order_by(ImageRow.group_position, ImageRow.image_index))
        return groups, images

    def page_groups(self, run_id: int, flt: ImageFilter, after: int | None = None, before: int | None = None,
                    limit: int = 20) -> tuple[list[PageGroup], bool]:
        """One page of groups in output order (keyset on position) with their images matching ``flt``:
        ``after`` the next page, ``before`` the previous one; returns them and whether more follow."""
        backwards = before is not None and after is None
        pg = self.engine.dialect.name == "postgresql"
        with self.engine.connect() as c:
            if flt.text and pg:
                # A common text fills the page from the next SEARCH_WINDOW groups, read in order by the
                # primary key; a rarer one is found beyond them by the trigram index (a bitmap of its
                # matches: small for a rare text). A window that reaches the run's end leaves nothing
                # beyond it: a common text's last page never asks the index for its millions of matches.
                if before is not None and after is None:  # backwards
                    window: tuple[int | None, int | None] = (before - SEARCH_WINDOW - 1, before)
                    beyond: tuple[int | None, int | None] = (None, before - SEARCH_WINDOW)
                else:
                    start = after if after is not None else -1
                    window, beyond = (start, start + SEARCH_WINDOW + 1), (start + SEARCH_WINDOW, None)
                near = self._positions(c, run_id, flt, "exact", *window, backwards, limit + 1)
                rest: list[int] = []
                last = None if len(near) > limit else c.execute(
                    select(func.max(GroupRow.position)).where(GroupRow.run_id == run_id)).scalar()
                lo, hi = beyond
                if last is not None and (lo is None or lo < last) and (hi is None or hi > 0):
                    # Finished rows by ix_images_search, groups by ix_groups_search, each asked for the
                    # text's words that are rare in the run (stage_a.store.search): two queries, each
                    # planned for its own index.
                    want = limit + 1 - len(near)
                    rare = rare_words(c, run_id, flt.text, last)
                    found = {p for part in ("finished", "groups")
                             for p in self._positions(c, run_id, flt, part, *beyond, backwards, want, rare)}
                    rest = sorted(found, reverse=backwards)[:want]
                positions = near + rest
            else:
                positions = self._positions(c, run_id, flt, "exact", after,
                                            before if backwards else None, backwards, limit + 1)
            more = len(positions) > limit
            positions = sorted(positions[:limit])
            if not positions:
                return [], False
            groups = c.execute(
                select(GroupRow.position, GroupRow.group_id, GroupRow.label, GroupRow.n_images)
                .where(GroupRow.run_id == run_id, GroupRow.position.in_(positions)).order_by(GroupRow.position)
            ).all()
            img_cond = _image_conditions(run_id, flt)  # one page's rows: the exact test is enough
            # The page's positions, not the range they span: a filter's matches may lie far apart.
            iq = select(*_PAGE_COLUMNS).where(ImageRow.run_id == run_id, ImageRow.group_position.in_(positions))
            if img_cond is not None:
                iq = iq.where(*img_cond)
            if flt.text:
                iq = iq.join(GroupRow, _GROUP_JOIN)
            images = c.execute(iq.order_by(ImageRow.group_position, ImageRow.image_index)).all()
        by_pos: dict[int, list[PageImage]] = {}
        for r in images:
            by_pos.setdefault(int(r[0]), []).append(PageImage(*r))  # type: ignore[call-arg]  # _PAGE_COLUMNS
        return [PageGroup(p, g, lab, n, by_pos.get(p, [])) for p, g, lab, n in groups], more

    @staticmethod
    def _positions(c: Any, run_id: int, flt: ImageFilter, rows: str, after: int | None, before: int | None,
                   backwards: bool, n: int, rare: RareWords | None = None) -> list[int]:
        """Up to ``n`` positions of groups showing under ``flt``, strictly between ``after`` and ``before``
        (None: unbounded), nearest ``after`` first (``backwards``: nearest ``before`` first); a text is
        searched by ``rows`` (see _image_conditions)."""
        img_cond = _image_conditions(run_id, flt, rows, rare)
        if img_cond is None:
            pos_q = select(GroupRow.position).where(GroupRow.run_id == run_id)
        else:
            pos_q = select(ImageRow.group_position).where(*img_cond).distinct()
            if flt.label or flt.text:
                pos_q = pos_q.join(GroupRow, _GROUP_JOIN)
        if flt.label:
            pos_q = pos_q.where(GroupRow.label == flt.label)
        col = pos_q.selected_columns[0]
        if after is not None:
            pos_q = pos_q.where(col > after)
        if before is not None:
            pos_q = pos_q.where(col < before)
        pos_q = pos_q.order_by(col.desc()) if backwards else pos_q.order_by(col)
        return [int(p) for (p,) in c.execute(pos_q.limit(n))]

    def failed_images(self, run_id: int, limit: int = 50) -> list[tuple[PageGroup, PageImage]]:
        """The first failed images in output order, with their group."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(GroupRow.position, GroupRow.group_id, GroupRow.label, GroupRow.n_images, *_PAGE_COLUMNS)
                .join(GroupRow, _GROUP_JOIN)
                .where(ImageRow.run_id == run_id, ImageRow.status == FAILED)
                .order_by(ImageRow.group_position, ImageRow.image_index).limit(limit)
            ).all()
        return [(PageGroup(r[0], r[1], r[2], r[3], []), PageImage(*r[4:])) for r in rows]  # type: ignore[call-arg]

    def image_location(self, run_id: int, group_position: int, image_index: int) -> tuple[str, str] | None:
        """(input_root, rel_path) of one image as the store recorded them."""
        with self.engine.connect() as c:
            row = c.execute(
                select(Run.input_root, ImageRow.rel_path)
                .join(Run, Run.id == ImageRow.run_id)
                .where(ImageRow.run_id == run_id, ImageRow.group_position == group_position,
                       ImageRow.image_index == image_index)
            ).first()
        return (str(row[0]), str(row[1])) if row else None


def _no_more_pages() -> Future[tuple[list[Any], list[Any]]]:
    done: Future[tuple[list[Any], list[Any]]] = Future()
    done.set_result(([], []))
    return done


def _unfinished() -> Any:
    """A run-counters row with images pending or leased (join RunCountsRow)."""
    return (RunCountsRow.pending + RunCountsRow.leased) > 0


def _image_conditions(run_id: int, flt: ImageFilter, rows: str = "exact",
                      rare: RareWords | None = None) -> list[Any] | None:
    """The conditions of ``flt`` on a run's image rows (a text's also on their group, joined). A text is
    searched, by ``rows``: "exact", the rule of stage_a.store.search tested on every row (SQLite, a bounded
    range of positions); on PostgreSQL "finished" or "groups", the candidates of one trigram index, asked for
    the ``rare`` words, rechecked by that rule's part the index covers."""
    conds: list[Any] = []
    if flt.failed:
        conds.append(ImageRow.status == FAILED)
    if flt.irrelevant:
        conds.append(ImageRow.summary == IRRELEVANT)
    if flt.text:
        pattern = like_pattern(flt.text)
        if rows == "exact":
            conds.append(text_match(pattern))
        else:
            conds += index_conditions(pattern, rare or RareWords((), ()), rows)
    return [ImageRow.run_id == run_id, *conds] if conds else None
