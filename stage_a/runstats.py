"""The end-of-run report (like Ray Data's ``stats()``): one RunStats read from the store, written beside
the JSONL as ``<mission>_stage_a_report.json`` by `stage-a run` and `stage-a export`, shown on the run page.

Three reads of the run's finished rows, whatever its size: the totals; per-image percentiles
(``percentile_cont`` of both stage columns in one scan on PostgreSQL; on SQLite the same linear
interpolation from the two ordered values around each rank, ORDER BY .. LIMIT 2 OFFSET k); and one
row per batch, grouped once more per worker and over all batches (GROUPING SETS on PostgreSQL; on
SQLite the batch rows are read and summed here). A
batch is one results commit: the rows one worker wrote with one ``updated_at``; its latency is the sum
of its images' shares (which is what each image stores).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text, tuple_
from sqlalchemy.sql import Select

from stage_a.failures import FAILURE_CLASSES, failure_class
from stage_a.store import ResultStore
from stage_a.store.models import DONE, FAILED, ImageRow, Run

QUANTILES = (0.5, 0.95)
STRAGGLER_FACTOR = 1.5
"""A worker is a straggler when its mean generate time per image exceeds the workers' median by this factor."""
REPORT_VERSION = 1
REPORT_WORK_MEM = "256MB"
"""PostgreSQL work_mem of the report's read (per sort or hash of it; the session default is 4 MB)."""


@dataclass(frozen=True)
class Distribution:
    """p50, p95 and max of one latency over ``n`` values (milliseconds)."""

    n: int
    p50: float | None
    p95: float | None
    max: float | None
    mean: float | None


@dataclass(frozen=True)
class WorkerShare:
    worker: str
    images: int
    share: float
    """Its fraction of the run's finished images."""
    generate_ms_mean: float | None
    """Mean generate time per image it recorded."""
    images_per_s: float | None
    """Images / the seconds of its batches (preprocess + generate): its rate while busy."""
    straggler: bool


@dataclass(frozen=True)
class RunStats:
    run_id: int
    mission: str
    model: str | None
    state: str
    """finished, cancelled or unfinished (pending or leased images remain)."""
    created_at: datetime
    first_activity_at: datetime | None
    last_result_at: datetime | None
    cancelled_at: datetime | None
    wall_s: float | None
    """From the run's creation to its last result (model loads included)."""
    active_s: float | None
    """From its first activity (the first lease or result) to its last result."""
    images_total: int
    done: int
    failed: int
    unfinished: int
    images_per_s: float | None
    """Finished images / active_s."""
    prompt_tokens: int
    completion_tokens: int
    vision_tokens: int
    per_image: dict[str, Distribution]
    """preprocess_ms and generate_ms of each image as stored (its share of its batch)."""
    per_batch: dict[str, Distribution]
    """The same summed over each batch (one results commit of one worker), and its size in images."""
    batches: int
    workers: tuple[WorkerShare, ...]
    stragglers: tuple[str, ...]
    failures_by_class: dict[str, int]
    model_load_s: dict[str, float] | None
    """Seconds per worker to load the model; None: not recorded in the store."""
    model_load_note: str
    device_hours: float | None
    """Workers that wrote results x active_s, in hours (one device per worker process)."""
    reused: int = 0
    """Done images whose summary was taken instead of generated (stage_a.reuse)."""
    reused_from: dict[str, int] | None = None
    """Run id (as text) -> images whose summary that run generated, most first (at most 20 runs)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = REPORT_VERSION
        return jsonable(d)


def jsonable(value: Any) -> Any:
    """``value`` as JSON types: datetimes as ISO UTC seconds, floats to 3 decimals (reports and status)."""
    if isinstance(value, datetime):
        return value.replace(microsecond=0).isoformat() + "Z"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def run_stats(store: ResultStore, run_id: int) -> RunStats:
    """The run's report, read from the store at this moment: three reads of the run's finished rows."""
    finished = ImageRow.status.in_((DONE, FAILED))
    of_run = ImageRow.run_id == run_id
    with store.engine.connect() as c:
        if c.dialect.name == "postgresql":
            # The percentiles sort the run's finished values and the batches hash its rows: in memory, not
            # in 4 MB runs spilled to disk (10M images: 20 s -> 11 s of database time). This read only.
            c.execute(text(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'"))
        run = c.execute(select(Run.mission, Run.model, Run.created_at, Run.cancelled_at).where(Run.id == run_id)).one()
        totals = c.execute(select(
            func.count(), func.count().filter(ImageRow.status == DONE), func.count().filter(ImageRow.status == FAILED),
            func.min(ImageRow.updated_at), func.max(ImageRow.updated_at).filter(finished),
            func.coalesce(func.sum(ImageRow.prompt_tokens), 0), func.coalesce(func.sum(ImageRow.completion_tokens), 0),
            func.coalesce(func.sum(ImageRow.vision_tokens), 0),
        ).where(of_run)).one()
        per_image = _image_distributions(c, run_id)
        per_batch, n_batches, by_worker = _batch_figures(c, run_id)
        errors = c.execute(select(ImageRow.error, func.count()).where(of_run, ImageRow.status == FAILED)
                           .group_by(ImageRow.error)).all()
    total, done, failed, first, last, prompt, completion, vision = totals
    n_finished = int(done) + int(failed)
    wall = (last - run.created_at).total_seconds() if last else None
    active = (last - first).total_seconds() if last and first else None
    workers = _workers(by_worker, n_finished)
    return RunStats(
        run_id=run_id, mission=run.mission, model=run.model,
        state="cancelled" if run.cancelled_at else ("finished" if n_finished == total else "unfinished"),
        created_at=run.created_at, first_activity_at=first, last_result_at=last, cancelled_at=run.cancelled_at,
        wall_s=wall, active_s=active, images_total=int(total), done=int(done), failed=int(failed),
        unfinished=int(total) - n_finished,
        images_per_s=n_finished / active if active and active > 0 else None,
        prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0), vision_tokens=int(vision or 0),
        per_image=per_image, per_batch=per_batch, batches=n_batches,
        workers=workers, stragglers=tuple(w.worker for w in workers if w.straggler),
        failures_by_class=_by_class(errors),
        model_load_s=None, model_load_note="not recorded: the store keeps no model load times "
                                           "(workers export stage_a_model_load_seconds on their metrics port)",
        device_hours=len(workers) * active / 3600 if active is not None and workers else None,
        reused=store.queries.counts(run_id, workers=False).reused,
        reused_from={str(r): n for r, n in store.queries.reuse_sources(run_id)},
    )


_BATCH_STAGES = ("preprocess_ms", "generate_ms", "images")


def _batches(run_id: int) -> Any:
    """One row per batch (a worker's rows with one updated_at): its images and the sums of their stage
    shares (NULL when none of its images has one, so the batch is left out of that distribution)."""
    return (
        select(ImageRow.worker.label("worker"), func.count().label("images"),
               func.sum(ImageRow.preprocess_ms).label("preprocess_ms"),
               func.sum(ImageRow.generate_ms).label("generate_ms"),
               func.count(ImageRow.generate_ms).label("generate_n"))
        .where(ImageRow.run_id == run_id, ImageRow.status.in_((DONE, FAILED)))
        .group_by(ImageRow.worker, ImageRow.updated_at).subquery()
    )


def _batch_figures(c: Connection, run_id: int) -> tuple[dict[str, Distribution], int, list[tuple[Any, ...]]]:
    """Per-batch distributions, the number of batches, and per worker (name, images, generate_ms sum,
    generate_ms n, busy ms). PostgreSQL: one statement (GROUPING SETS: each worker, and all batches);
    SQLite: the batch rows read here."""
    b = _batches(run_id)
    per_worker = (func.count(), func.sum(b.c.images), func.sum(b.c.generate_ms), func.sum(b.c.generate_n),
                  func.sum(func.coalesce(b.c.preprocess_ms, 0) + func.coalesce(b.c.generate_ms, 0)))
    if c.dialect.name == "postgresql":
        stats: list[Any] = []
        for name in _BATCH_STAGES:
            col = b.c[name]
            stats += [func.count(col), func.max(col), func.avg(col),
                      *[func.percentile_cont(q).within_group(col) for q in QUANTILES]]
        rows = c.execute(select(func.grouping(b.c.worker), b.c.worker, *per_worker, *stats)
                         .group_by(func.grouping_sets(tuple_(b.c.worker), tuple_()))).all()
        by_worker, per_batch, n_batches = [], {n: Distribution(0, None, None, None, None) for n in _BATCH_STAGES}, 0
        for row in rows:
            if not row[0]:
                by_worker.append((row[1], *row[3:7]))
                continue
            n_batches = int(row[2])
            for i, name in enumerate(_BATCH_STAGES):
                n, top, mean, p50, p95 = row[7 + i * 5:12 + i * 5]
                if n:
                    per_batch[name] = Distribution(int(n), float(p50), float(p95), float(top), float(mean))
        return per_batch, n_batches, by_worker
    batches = c.execute(select(b.c.worker, b.c.images, b.c.preprocess_ms, b.c.generate_ms, b.c.generate_n)).all()
    per: dict[Any, list[float]] = {}
    for w, n, pre, gen, gen_n in batches:
        acc = per.setdefault(w, [0, 0.0, 0, 0.0])
        acc[0] += n
        acc[1] += gen or 0.0
        acc[2] += gen_n
        acc[3] += (pre or 0.0) + (gen or 0.0)
    per_batch = {name: _distribution([float(r[i]) for r in batches if r[i] is not None])
                 for i, name in ((2, "preprocess_ms"), (3, "generate_ms"), (1, "images"))}
    return per_batch, len(batches), [(w, *acc) for w, acc in per.items()]


def _workers(rows: list[tuple[Any, ...]], n_finished: int) -> tuple[WorkerShare, ...]:
    """(name, images, generate_ms sum, generate_ms n, busy ms) per worker, most images first."""
    shares = sorted(((str(w or "-"), int(n), float(g) / int(gn) if gn else None, float(busy or 0))
                     for w, n, g, gn, busy in rows), key=lambda r: (-r[1], r[0]))
    means = sorted(m for _, _, m, _ in shares if m is not None)
    median = _median(means)
    out = []
    for name, n, mean, busy_ms in shares:
        slow = len(means) >= 2 and median is not None and mean is not None and mean > STRAGGLER_FACTOR * median
        out.append(WorkerShare(
            worker=name, images=n, share=n / n_finished if n_finished else 0.0, generate_ms_mean=mean,
            images_per_s=n / (busy_ms / 1000) if busy_ms else None, straggler=slow))
    return tuple(out)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _by_class(errors: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for error, n in errors:
        c = failure_class(error)
        out[c] = out.get(c, 0) + int(n)
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], FAILURE_CLASSES.index(kv[0]))))


def _distribution(values: list[float]) -> Distribution:
    """n, p50, p95, max and mean of ``values`` (percentile_cont's interpolation)."""
    if not values:
        return Distribution(0, None, None, None, None)
    ordered = sorted(values)
    n = len(ordered)

    def quantile(q: float) -> float:
        rank = q * (n - 1)
        k = math.floor(rank)
        lo = ordered[k]
        return lo if rank == k else lo + (ordered[k + 1] - lo) * (rank - k)

    return Distribution(n, quantile(QUANTILES[0]), quantile(QUANTILES[1]), ordered[-1], sum(ordered) / n)


def _image_distributions(c: Connection, run_id: int) -> dict[str, Distribution]:
    """preprocess_ms and generate_ms per finished image: one scan on PostgreSQL (percentile_cont of both
    columns at once); on SQLite an aggregate and two ordered offsets per quantile."""
    cols = (("preprocess_ms", ImageRow.preprocess_ms), ("generate_ms", ImageRow.generate_ms))
    where = [ImageRow.run_id == run_id, ImageRow.status.in_((DONE, FAILED))]
    if c.dialect.name == "postgresql":
        aggs: list[Any] = []
        for _, col in cols:
            aggs += [func.count(col), func.max(col), func.avg(col),
                     *[func.percentile_cont(q).within_group(col) for q in QUANTILES]]
        row = c.execute(select(*aggs).where(*where)).one()
        out = {}
        for i, (name, _) in enumerate(cols):
            n, top, mean, p50, p95 = row[i * 5:(i + 1) * 5]
            out[name] = (Distribution(int(n), float(p50), float(p95), float(top), float(mean)) if n
                         else Distribution(0, None, None, None, None))
        return out
    out = {}
    for name, col in cols:
        present = [*where, col.is_not(None)]
        n, top, mean = c.execute(select(func.count(col), func.max(col), func.avg(col)).where(*present)).one()
        n = int(n or 0)
        if n == 0:
            out[name] = Distribution(0, None, None, None, None)
            continue
        ordered = select(col).where(*present).order_by(col)
        qs = [_quantile_by_offset(c, ordered, n, q) for q in QUANTILES]
        out[name] = Distribution(n, qs[0], qs[1], float(top), float(mean))
    return out


def _quantile_by_offset(c: Connection, ordered: Select[Any], n: int, q: float) -> float:
    """percentile_cont(q): the value at rank q*(n-1), interpolated between its two neighbours."""
    rank = q * (n - 1)
    k = math.floor(rank)
    pair = [float(v) for (v,) in c.execute(ordered.limit(2).offset(k))]
    if len(pair) == 1 or rank == k:
        return pair[0]
    return pair[0] + (pair[1] - pair[0]) * (rank - k)
