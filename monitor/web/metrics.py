"""Prometheus metrics read from the store at scrape time (own registry).

Per run (the newest RUNS_IN_METRICS runs and every unfinished one, so the run label stays bounded):
images by state, the run's state as a 0/1 gauge per state, recent images/s, dead letters, when it was
created (deadline alerts) and whether no online worker can serve it (no-worker alerts); labelled
run, mission and model (the base model whose workers serve it). Farm-wide: images finished and dead
letters as counters (they only grow, so rate() works), workers online by the model they hold and by
state, and, only when the store has a broker (a farm's PostgreSQL store; a SQLite store is one
machine's `stage-a run`), each model queue's length and stage_a_broker_up. Worker hosts export their
own series (workers/metrics.py); deploy/prometheus scrapes both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.report import STATES, QueueProbe, list_runs
from stage_a.settings import Settings
from stage_a.store import utcnow

if TYPE_CHECKING:
    from prometheus_client import Metric

    from stage_a.store import ResultStore
    from stage_a.store.queries import RunRow, WorkerBeat

log = logging.getLogger(__name__)

RUNS_IN_METRICS = 20
UNPINNED = "*"
"""The model label of online workers that hold no pinned model: they load any run's model."""


class StoreCollector(Collector):
    def __init__(self, store: ResultStore, settings: Settings, queue: QueueProbe) -> None:
        self.store = store
        self.settings = settings
        self.queue = queue
        self._task_queue: object | None = None

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        workers = self.store.queries.worker_beats(now, self.settings.heartbeat_timeout)
        yield from self._runs(now, workers)
        yield from self._totals()
        if self.has_broker():
            yield from self._queues()
        yield from self._workers(workers)

    # ---- per run ---------------------------------------------------------------------------------

    def _runs(self, now: object, workers: list[WorkerBeat]) -> Iterator[Metric]:
        runs = list_runs(self.store, RUNS_IN_METRICS, self.settings, now)  # type: ignore[arg-type]
        older = sorted(set(self.store.queries.unfinished_run_ids()) - {r.run_id for r in runs})
        if older:
            runs += list_runs(self.store, len(older), self.settings, now, older)  # type: ignore[arg-type]
        rows = {r.id: r for r in self.store.queries.run_rows(len(runs), [r.run_id for r in runs])} if runs else {}
        labels = ["run", "mission", "model"]
        images = GaugeMetricFamily("stage_a_run_images", "Images of a run by state.", labels=[*labels, "state"])
        state = GaugeMetricFamily("stage_a_run_state", "1 for the run's current state.", labels=[*labels, "state"])
        rate = GaugeMetricFamily("stage_a_run_images_per_second",
                                 "Images finished per second over the recent window (0 once finished).",
                                 labels=["run"])
        dead = GaugeMetricFamily("stage_a_run_dead_letters", "Dead-lettered messages naming the run.",
                                 labels=["run"])
        created = GaugeMetricFamily("stage_a_run_created_timestamp_seconds", "When the run was registered.",
                                    labels=labels)
        unserved = GaugeMetricFamily(
            "stage_a_run_unserved", "1 for an unfinished farm run that no online worker can serve (none holds its "
            "model and none is unpinned).", labels=labels)
        serving = _served_models(workers)
        for r in runs:
            row = rows.get(r.run_id)
            values = [str(r.run_id), r.mission, _route(row)]
            for name, n in (("pending", r.pending), ("in_flight", r.in_flight), ("done", r.done),
                            ("failed", r.failed)):
                images.add_metric([*values, name], n)
            for s in STATES:
                state.add_metric([*values, s], 1.0 if r.state == s else 0.0)
            rate.add_metric([values[0]], r.recent_images_per_s or 0.0)
            dead.add_metric([values[0]], r.dead_letters)
            created.add_metric(values, r.created_at.timestamp())
            open_farm_run = r.farm and r.state in ("running", "stalled") and (r.pending + r.in_flight) > 0
            unserved.add_metric(values, 1.0 if open_farm_run and not _can_serve(serving, values[2]) else 0.0)
        yield from (images, state, rate, dead, created, unserved)

    # ---- farm-wide -------------------------------------------------------------------------------

    def _totals(self) -> Iterator[Metric]:
        finished = CounterMetricFamily("stage_a_images_finished", "Images finished, all runs, by outcome.",
                                       labels=["mission", "model", "outcome"])
        for (mission, model, status), n in sorted(self.store.queries.finished_by_mission_model().items()):
            finished.add_metric([mission, model, status], n)
        yield finished
        dead = CounterMetricFamily("stage_a_dead_letters", "Dead-lettered messages, all runs.")
        dead.add_metric([], sum(self.store.queries.dead_letter_counts().values()))
        yield dead

    def has_broker(self) -> bool:
        """A broker is part of this deployment: one is configured and the store is not one machine's SQLite
        file (farm runs refuse SQLite, so its runs never used the broker the default URL names)."""
        return bool(self.settings.broker_url) and self.store.engine.dialect.name != "sqlite"

    def _queues(self) -> Iterator[Metric]:
        routes = sorted(w.route for w in self.store.queries.routes_with_work())
        up = GaugeMetricFamily("stage_a_broker_up", "1 when the broker answered the queue-length query.")
        try:
            from stage_a.queue import TaskQueue

            if self._task_queue is None:
                self._task_queue = TaskQueue(self.settings, fail_fast=True)
            tq: TaskQueue = self._task_queue  # type: ignore[assignment]
            lengths = tq.lengths([tq.queue_for(None)] + [tq.queue_for(r) for r in routes])
        except Exception as exc:  # a broker down is a 0, never a failed scrape
            log.debug("queue lengths unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        q = GaugeMetricFamily("stage_a_queue_length", "Messages waiting on each model's queue (model \"\": the "
                              "plain queue every worker also reads).", labels=["model"])
        for model, n in zip(["", *routes], lengths, strict=True):
            q.add_metric([model], n)
        yield q

    def _workers(self, workers: list[WorkerBeat]) -> Iterator[Metric]:
        online = GaugeMetricFamily("stage_a_workers_online", "Worker processes with a fresh heartbeat, by the "
                                   f"model they hold (\"{UNPINNED}\": unpinned, any model).", labels=["model"])
        for model, n in sorted(_served_models(workers).items()):
            online.add_metric([model], n)
        yield online
        by_state = GaugeMetricFamily("stage_a_workers", "Worker processes by state.", labels=["state"])
        counts: dict[str, int] = {}
        for w in workers:
            counts[w.state] = counts.get(w.state, 0) + 1
        for s, n in sorted(counts.items()):
            by_state.add_metric([s], n)
        yield by_state


def _route(row: RunRow | None) -> str:
    return (row.route or "") if row is not None else ""


def _served_models(workers: list[WorkerBeat]) -> dict[str, int]:
    """Online workers by the model they serve: a pinned one its model, an unpinned one any (UNPINNED)."""
    out: dict[str, int] = {}
    for w in workers:
        if not w.online:
            continue
        model = (w.model or UNPINNED) if w.pinned else UNPINNED
        out[model] = out.get(model, 0) + 1
    return out


def _can_serve(serving: dict[str, int], route: str) -> bool:
    return bool(serving.get(UNPINNED) or (route and serving.get(route)))


def metrics_registry(store: ResultStore, settings: Settings, queue: QueueProbe) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, settings, queue))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
