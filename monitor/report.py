"""What a run is doing, read from the store (and the broker's queue length): one RunReport.

`status`, `runs`, the web pages, `/api/runs/{id}` and `/metrics` all build their view here, so they
never disagree; one report costs one `store.queries.counts` (the run's counters) plus a few bounded
queries, whatever the run's size. Every rate
divides by a span of at least MIN_SPAN_S from the run's first activity (else its creation).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from stage_a.errors import UserError, first_line
from stage_a.runstats import jsonable
from stage_a.settings import Settings
from stage_a.store import check_run_id, utcnow
from stage_a.store.queries import DeadHolder, ModelShare, ReclaimerBeat, RunCounts, RunRow, WorkerBeat

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stage_a.queue import TaskQueue
    from stage_a.store import ResultStore

log = logging.getLogger(__name__)

STATES = ("running", "stalled", "finished", "cancelled")
MIN_SPAN_S = 1.0


@dataclass(frozen=True)
class Throughput:
    recent_images_per_s: float | None
    """Images finished in the last ``window_s`` seconds per second."""
    window_s: float
    """The span the recent rate divides by: STAGE_A_RATE_WINDOW, or less for a run whose first activity
    (its first lease or result, after any model load) is younger than that."""
    overall_images_per_s: float | None
    """Images finished per second from the run's first activity to its last result."""
    eta_s: float | None
    """Unfinished images / the recent rate (the overall rate while the run is too young for one); None
    unless the run is running and images finish (a stalled, cancelled or idle run has no ETA)."""


@dataclass(frozen=True)
class StageTimings:
    """Means over the images that recorded them (per image: its share of its batch)."""

    preprocess_ms: float | None
    generate_ms: float | None
    tokens_per_s: float | None
    """Completion tokens / generation seconds, summed over images (the engine's decode rate)."""


@dataclass(frozen=True)
class RunReport:
    run_id: int
    mission: str
    dataset: str
    checkpoint: str
    model: str | None
    """Fingerprint the run must be served with (None: recorded before runs carried one)."""
    models_served: tuple[ModelShare, ...]
    """(model, engine, images) that produced the done images."""
    farm: bool
    sharding_mode: str
    created_at: datetime
    cancelled_at: datetime | None
    now: datetime
    elapsed_s: float
    images_total: int
    done: int
    failed: int
    pending: int
    in_flight: int
    groups_total: int
    groups_complete: int
    groups_with_failures: int
    dead_letters: int
    queue_length: int | None
    """Messages waiting on the broker queue (all runs share it); None: no broker or unreachable."""
    queue_note: str | None
    """Why the queue length is unknown, or a warning about the broker (an evicting Redis)."""
    workers_online: int
    """Workers with a fresh heartbeat that can serve this run's model."""
    workers: tuple[WorkerBeat, ...]
    result_writers: tuple[str, ...]
    """Worker names found on the run's image rows (who leased or wrote them)."""
    first_activity_at: datetime | None
    last_result_at: datetime | None
    throughput: Throughput
    timings: StageTimings
    state: str
    reason: str | None
    """Why the run is stalled, and what to do (or what it waits for while running)."""
    dead_holders: tuple[DeadHolder, ...] = ()
    """Workers holding leases of this run that stopped beating (the reclaimers re-send those images)."""
    reclaimers_failing: tuple[ReclaimerBeat, ...] = ()
    """Hosts whose reclaimer's last pass failed (with since when and why)."""
    failures_by_class: dict[str, int] = field(default_factory=dict)
    """Failed images by reason class (stage_a.failures), most first: of the first ``failures_classified``."""
    failures_classified: int = 0
    """Failed images whose reasons ``failures_by_class`` counts: all of them, or the first
    FAILURE_SAMPLE in output order (a report reads a bounded number of rows)."""
    reused: int = 0
    """Done images whose summary was taken from a run that generated it (stage_a.reuse) instead of generated."""
    reused_from: tuple[tuple[int, int], ...] = ()
    """(run that generated them, images) of the reused summaries, most first (build_report's ``reuse_sources``)."""

    @property
    def finished_images(self) -> int:
        return self.done + self.failed

    @property
    def fraction(self) -> float:
        return self.finished_images / self.images_total if self.images_total else 1.0

    def to_json(self) -> dict[str, Any]:
        """One JSON object (what `status --json` prints and /api/runs/{id} returns)."""
        d = asdict(self)
        d["finished"] = self.finished_images
        d["models_served"] = [asdict(m) for m in self.models_served]
        d["dead_holders"] = [asdict(h) for h in self.dead_holders]
        d["reclaimers_failing"] = [asdict(b) for b in self.reclaimers_failing]
        return jsonable(d)


class QueueProbe:
    """Broker queue length, tolerant of a broker that is down (None and a note, never an exception)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: TaskQueue | None = None

    def length(self, route: str | None = None) -> tuple[int | None, str | None]:
        """Messages waiting on the queue of model ``route`` (None: the plain queue)."""
        if not self.settings.broker_url:
            return None, "no broker configured"
        try:
            if self._queue is None:
                from stage_a.queue import TaskQueue

                self._queue = TaskQueue(self.settings, fail_fast=True)
            length = self._queue.length(self._queue.queue_for(route))
            return length, self._queue.eviction_warning()  # views warn, never refuse
        except Exception as exc:  # Redis down or misconfigured: say unknown, keep the view working
            from stage_a.secrets import hide_secrets

            first = first_line(exc)
            first = hide_secrets(first, self.settings.broker_url)
            log.debug("queue length unavailable: %s", first)
            return None, f"broker unreachable ({first[:120]})"


def nearest_run_ids(store: ResultStore, run_id: int, n: int = 5) -> list[int]:
    """Existing run ids closest to ``run_id`` (by value, then by spelling)."""
    ids = store.queries.run_ids()
    by_value = sorted(ids, key=lambda i: (abs(i - run_id), -i))[:n]
    spelled = [int(s) for s in difflib.get_close_matches(str(run_id), [str(i) for i in ids], n=2, cutoff=0.6)]
    out: list[int] = []
    for i in spelled + by_value:
        if i not in out:
            out.append(i)
    return sorted(out[:n])


def require_run(store: ResultStore, run_id: int) -> RunRow:
    """The run, or a UserError that names the nearest existing ids."""
    check_run_id(run_id)
    row = store.queries.run_row(run_id)
    if row is not None:
        return row
    near = nearest_run_ids(store, run_id)
    hint = f"; nearest existing: {', '.join(map(str, near))} (stage-a runs lists them)" if near else \
        "; the database has no runs yet"
    raise UserError(f"no run {run_id} in {store.display_url}{hint}")


def _serves(worker: WorkerBeat, run: RunRow) -> bool:
    """A worker serves the run when it holds the run's base model, or it is not tied to one (an unpinned
    worker loads each run's model) and has not found that model's checkpoint to differ on its host."""
    if worker.pinned is False:
        return not (worker.problem and run.route and run.route in worker.problem)
    return worker.model is None or run.route is None or worker.model == run.route or worker.run_id == run.id


def _no_worker(run: RunRow, workers: Sequence[WorkerBeat]) -> str:
    """Why no online worker serves the run: which model it needs and what the online workers hold."""
    online = [w for w in workers if w.online]
    held = sorted({w.model or "?" for w in online if w.pinned is not False})
    unpinned = [w for w in online if w.pinned is False]
    text = f"no worker holds model {run.route}"
    if held or unpinned:
        parts = [", ".join(held)] if held else []
        if unpinned:
            parts.append(f"{len(unpinned)} unpinned")
        text += f"; online workers hold {', '.join(parts)}"
    problems = sorted({w.problem for w in unpinned if w.problem and run.route and run.route in w.problem})
    if problems:
        text += f" ({problems[0]})"
    return text


def build_report(store: ResultStore, run_id: int, settings: Settings,
                 queue: QueueProbe | None = None, now: datetime | None = None,
                 beats: list[WorkerBeat] | None = None, writers: bool = True, reuse_sources: bool = True) -> RunReport:
    """The RunReport of ``run_id``; UserError (with the nearest ids) when there is no such run.
    ``queue``: the queue length's source (None: unknown); ``beats``: the workers table already read at
    ``now``; ``writers``: also the worker names on the run's rows (one more scan of the run); ``reuse_sources``:
    also which runs its reused summaries come from (a scan of its reused rows)."""
    run = require_run(store, run_id)
    now = now or utcnow()
    window = settings.rate_window
    agg = store.queries.counts(run_id, now - timedelta(seconds=window), workers=writers)
    dead = store.queries.dead_letter_counts([run_id]).get(run_id, 0)
    workers = store.queries.worker_beats(now, settings.heartbeat_timeout) if beats is None else beats
    relevant = [w for w in workers if (w.run_id == run_id or (w.online and _serves(w, run)))
                and (w.online or w.heartbeat_age_s <= settings.worker_shown_for)]  # stopped ones age out
    online = sum(1 for w in relevant if w.online and _serves(w, run))
    if queue is not None and run.farm:
        queue_length, queue_note = queue.length(run.route)
    else:
        queue_length, queue_note = None, (None if run.farm else "not a farm run")

    holder_timeout = settings.holder_timeout_seconds
    dead_holders = (store.queries.dead_holders(run_id, now - timedelta(seconds=holder_timeout))
                    if holder_timeout is not None and run.farm and agg.leased and not run.cancelled_at else [])
    failing = [b for b in store.queries.reclaimer_beats() if b.failing_since is not None]
    tokens_per_s = (agg.completion_tokens / (agg.generate_ms_with_tokens / 1000.0)
                    if agg.generate_ms_with_tokens > 0 else None)
    state, reason = _state(run, agg.pending, agg.leased, agg.last_update, agg.first_activity, online,
                           queue_length, now, settings, workers, dead_holders)
    if state == "stalled":
        reason = _with_causes(reason, run, dead, failing)
    refusing = sorted({f"worker {w.name}: {w.problem}" for w in workers
                       if w.online and w.problem and f"run {run.id} " in f"{w.problem} "})
    if refusing and state in ("running", "stalled"):  # e.g. the adapter at the run's path differs on its host
        note = "; ".join(refusing[:3])
        reason = f"{reason}; {note}" if reason else note
    throughput = _throughput(run, agg, now, window, state)
    end = run.cancelled_at or (agg.last_update if state == "finished" and agg.last_update else now)
    by_class = _by_class(store.queries.failure_texts(run_id)) if agg.failed else {}
    return RunReport(
        run_id=run.id, mission=run.mission, dataset=run.dataset, checkpoint=run.checkpoint, model=run.model,
        models_served=agg.models, farm=run.farm, sharding_mode=run.sharding_mode, created_at=run.created_at,
        cancelled_at=run.cancelled_at, now=now, elapsed_s=max(0.0, (end - run.created_at).total_seconds()),
        images_total=agg.images_total, done=agg.done, failed=agg.failed, pending=agg.pending, in_flight=agg.leased,
        groups_total=agg.groups_total, groups_complete=agg.groups_done, groups_with_failures=agg.groups_failed,
        dead_letters=dead, queue_length=queue_length, queue_note=queue_note, workers_online=online,
        workers=tuple(relevant), result_writers=agg.workers,
        first_activity_at=agg.first_activity, last_result_at=agg.last_update,
        throughput=throughput,
        timings=StageTimings(agg.preprocess_ms_mean, agg.generate_ms_mean, tokens_per_s),
        state=state, reason=reason, dead_holders=tuple(dead_holders), reclaimers_failing=tuple(failing),
        failures_by_class=by_class, failures_classified=sum(by_class.values()),
        reused=agg.reused,
        reused_from=tuple(store.queries.reuse_sources(run_id)) if agg.reused and reuse_sources else (),
    )


def _throughput(run: RunRow, agg: RunCounts, now: datetime, window: float, state: str) -> Throughput:
    """Rates over the spans they really cover, from the run's first activity (a lease or a result, so a
    model load before it is not counted) and never from one timestamp; an ETA only while running."""
    finished = agg.done + agg.failed
    start = agg.first_activity or run.created_at
    overall = None
    if finished and agg.last_update is not None:
        span = (agg.last_update - start).total_seconds()
        if span < MIN_SPAN_S:
            span = (agg.last_update - run.created_at).total_seconds()
        overall = finished / span if span >= MIN_SPAN_S else None
    unfinished = agg.pending + agg.leased
    # The counted window starts at its 10-second bucket (RunCounts.recent_from), not at now - window.
    window_start = agg.recent_from or (now - timedelta(seconds=window))
    span_s = max(0.0, (now - max(start, window_start)).total_seconds())
    recent = None
    if unfinished and not run.cancelled_at and span_s >= MIN_SPAN_S:
        recent = agg.finished_since / span_s
    # A young run has no recent window yet: the overall rate stands in. A zero recent rate means
    # nothing finishes now: no ETA (the overall rate would promise one that nothing supports).
    rate = recent if recent is not None else overall
    eta = unfinished / rate if state == "running" and unfinished and rate else None
    return Throughput(recent, round(span_s, 3), overall, eta)


def _by_class(texts: Sequence[tuple[str | None, int]]) -> dict[str, int]:
    """{failure class: images}, most first (then in FAILURE_CLASSES order)."""
    from stage_a.failures import FAILURE_CLASSES, failure_class

    out: dict[str, int] = {}
    for error, n in texts:
        c = failure_class(error)
        out[c] = out.get(c, 0) + n
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], FAILURE_CLASSES.index(kv[0]))))


def _with_causes(reason: str | None, run: RunRow, dead_letters: int, failing: Sequence[ReclaimerBeat]) -> str | None:
    """A stalled run's reason, with the dead letters and failing reclaimers that may explain it."""
    extra = []
    if dead_letters:
        extra.append(f"{dead_letters} dead letters (stage-a dead-letters {run.id})")
    extra += [reclaimer_line(b) for b in failing]
    if not extra:
        return reason
    return "; ".join([reason, *extra] if reason else extra)


def _state(run: RunRow, pending: int, leased: int, last_result: datetime | None, first_activity: datetime | None,
           workers_online: int, queue_length: int | None, now: datetime,
           settings: Settings, workers: Sequence[WorkerBeat] = (),
           dead_holders: Sequence[DeadHolder] = ()) -> tuple[str, str | None]:
    if run.cancelled_at is not None:
        left = pending + leased
        return "cancelled", (f"cancelled at {run.cancelled_at.strftime('%Y-%m-%d %H:%M:%S')}Z" +
                             (f"; {left} images not processed: run cancelled" if left else ""))
    unfinished = pending + leased
    if unfinished == 0:
        return "finished", None
    if dead_holders:
        note = dead_holder_note(dead_holders, now)
        if run.farm and workers_online == 0:
            return "stalled", (f"{note}; no worker online to take them: start workers (systemctl start "
                               f"stage-a-worker@0, or celery -A workers worker)")
        held = sum(d.images for d in dead_holders)
        # Only the dead holders' images left: nothing moves until a reclaimer re-sends them.
        return ("stalled" if held == unfinished else "running"), (
            f"{note}; a reclaimer re-sends them within STAGE_A_RECLAIM_INTERVAL={settings.reclaim_interval:.0f} s "
            f"(stage-a reclaim does it now)")
    since_result = (now - last_result).total_seconds() if last_result else None
    stopped = _stopped_since(run, workers, last_result) if run.farm and workers_online == 0 else None
    if stopped is not None:
        # Every worker that served the run said it stops: no need to wait out the heartbeat timeout.
        return "stalled", (f"every worker for model {run.route or '?'} stopped (last {stopped.name} at "
                           f"{stopped.heartbeat_at.strftime('%Y-%m-%d %H:%M:%S')}Z) and {unfinished} images "
                           f"unfinished: start workers (systemctl start stage-a-worker@0, or celery -A workers "
                           f"worker)")
    if run.farm and workers_online == 0 and (since_result is None or since_result > settings.heartbeat_timeout):
        if any(w.online for w in workers) and run.route:
            return "stalled", (f"{_no_worker(run, workers)}, and {unfinished} images unfinished: start a worker "
                               f"with STAGE_A_CHECKPOINT set to that model, or an unpinned one on a host where "
                               f"{run.checkpoint or 'the demo model'} holds it")
        return "stalled", (f"no worker online for model {run.route or '?'} (none sent a heartbeat in the last "
                           f"{settings.heartbeat_timeout:.0f} s) and {unfinished} images unfinished: start workers "
                           f"(systemctl start stage-a-worker@0, or celery -A workers worker) and check their logs")
    quiet = since_result if since_result is not None else (now - (first_activity or run.created_at)).total_seconds()
    if quiet > settings.stall_seconds:
        what = f"no result for {human_duration(quiet)}" if last_result else f"no result since {human_duration(quiet)}"
        if not run.farm:
            todo = (f"if its `stage-a run` process is gone, resume it: stage-a run --resume --run {run.id} "
                    "--db <this database> --output-dir <dir>")
        elif queue_length == 0 and pending:
            todo = (f"the queue is empty while {pending} images are pending (messages lost?): "
                    f"stage-a enqueue --run {run.id} re-enqueues them")
        else:
            todo = "check the workers' logs (journalctl -u stage-a-worker@0)"
        return "stalled", (f"{what} (STAGE_A_STALL_SECONDS={settings.stall_seconds:.0f}) with {unfinished} images "
                           f"unfinished; {todo}")
    return "running", None


def _stopped_since(run: RunRow, workers: Sequence[WorkerBeat], last_result: datetime | None) -> WorkerBeat | None:
    """The last worker to stop, when workers that served the run (or could) all said they stop after
    its last result and none is online; else None."""
    if any(w.online for w in workers if _serves(w, run)):
        return None
    stopped = [w for w in workers if w.state == "stopped" and (w.run_id == run.id or _serves(w, run))]
    if not stopped:
        return None
    last = max(stopped, key=lambda w: w.heartbeat_at)
    return last if last_result is None or last.heartbeat_at >= last_result else None


def dead_holder_note(dead_holders: Sequence[DeadHolder], now: datetime) -> str:
    """"N images leased by offline worker W since T" for each dead holder."""
    parts = []
    for d in dead_holders:
        what = "stopped" if d.state == "stopped" else "offline"
        parts.append(f"{d.images} images leased by {what} worker {d.worker} since "
                     f"{d.heartbeat_at.strftime('%Y-%m-%d %H:%M:%S')}Z "
                     f"(last heartbeat {human_duration((now - d.heartbeat_at).total_seconds())} ago)")
    return "; ".join(parts)


def reclaimer_line(b: ReclaimerBeat) -> str:
    """"reclaimer on HOST failing since T: problem"."""
    since = b.failing_since.strftime("%Y-%m-%d %H:%M:%S") + "Z" if b.failing_since else "-"
    return f"reclaimer on {b.host} failing since {since}: {b.problem or 'unknown problem'}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass(frozen=True)
class RunSummary:
    """One line of `stage-a runs` and of the web index (cheap: no per-run aggregate scan)."""

    run_id: int
    mission: str
    model: str | None
    checkpoint: str
    farm: bool
    created_at: datetime
    state: str
    images_total: int
    done: int
    failed: int
    pending: int
    in_flight: int
    dead_letters: int
    recent_images_per_s: float | None = None
    """Only for unfinished runs (their full report is built)."""
    reason: str | None = None

    @property
    def fraction(self) -> float:
        return (self.done + self.failed) / self.images_total if self.images_total else 1.0

    def to_json(self) -> dict[str, Any]:
        return dict(jsonable(asdict(self)), finished=self.done + self.failed)


def list_runs(store: ResultStore, limit: int, settings: Settings,
              now: datetime | None = None, ids: Sequence[int] | None = None) -> list[RunSummary]:
    """Runs newest first (or the given ids) with counts and state; full reports only for unfinished runs
    (their state depends on activity), so a list of many finished runs stays one index-only aggregate."""
    now = now or utcnow()
    runs = store.queries.run_rows(limit, ids)
    counts = store.queries.status_counts([r.id for r in runs])
    dead = store.queries.dead_letter_counts([r.id for r in runs])
    beats: list[WorkerBeat] | None = None
    out = []
    for r in runs:
        c = counts.get(r.id, {})
        pending, leased = c.get("pending", 0), c.get("leased", 0)
        rate, reason = None, None
        if r.cancelled_at is not None:
            state, reason = _state(r, pending, leased, None, None, 0, None, now, settings)
        elif pending + leased == 0:
            state = "finished"
        else:
            if beats is None:
                beats = store.queries.worker_beats(now, settings.heartbeat_timeout)
            report = build_report(store, r.id, settings, None, now, beats, writers=False, reuse_sources=False)
            state, rate, reason = report.state, report.throughput.recent_images_per_s, report.reason
        out.append(RunSummary(
            run_id=r.id, mission=r.mission, model=r.model, checkpoint=r.checkpoint, farm=r.farm,
            created_at=r.created_at, state=state, images_total=sum(c.values()), done=c.get("done", 0),
            failed=c.get("failed", 0), pending=pending, in_flight=leased, dead_letters=dead.get(r.id, 0),
            recent_images_per_s=rate, reason=reason,
        ))
    return out
