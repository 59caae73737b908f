"""Prometheus metrics read from the store at scrape time (own registry; labels: run, state).

Per run (the newest runs and every unfinished one): images by state, the run's state as a 0/1
gauge per state, recent images/s, dead letters. Farm-wide: broker queue length (absent when the
broker is unreachable; stage_a_broker_up says which), workers online, workers by state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.report import STATES, QueueProbe, list_runs
from stage_a.settings import Settings
from stage_a.store import utcnow

if TYPE_CHECKING:
    from prometheus_client import Metric

    from stage_a.store import ResultStore

RUNS_IN_METRICS = 20


class StoreCollector(Collector):
    def __init__(self, store: ResultStore, settings: Settings, queue: QueueProbe) -> None:
        self.store = store
        self.settings = settings
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        runs = list_runs(self.store, RUNS_IN_METRICS, self.settings, now)
        older = sorted(set(self.store.queries.unfinished_run_ids()) - {r.run_id for r in runs})
        if older:
            runs += list_runs(self.store, len(older), self.settings, now, older)
        images = GaugeMetricFamily("stage_a_run_images", "Images of a run by state.", labels=["run", "state"])
        state = GaugeMetricFamily("stage_a_run_state", "1 for the run's current state.", labels=["run", "state"])
        rate = GaugeMetricFamily("stage_a_run_images_per_second",
                                 "Images finished per second over the recent window (0 once finished).",
                                 labels=["run"])
        dead = GaugeMetricFamily("stage_a_run_dead_letters", "Dead-lettered messages naming the run.",
                                 labels=["run"])
        for r in runs:
            run = str(r.run_id)
            for name, n in (("pending", r.pending), ("in_flight", r.in_flight), ("done", r.done),
                            ("failed", r.failed)):
                images.add_metric([run, name], n)
            for s in STATES:
                state.add_metric([run, s], 1.0 if r.state == s else 0.0)
            rate.add_metric([run], r.recent_images_per_s or 0.0)
            dead.add_metric([run], r.dead_letters)
        yield from (images, state, rate, dead)

        length, _ = self.queue.length()
        up = GaugeMetricFamily("stage_a_broker_up", "1 when the broker answered the queue-length query.")
        up.add_metric([], 1.0 if length is not None else 0.0)
        yield up
        if length is not None:
            q = GaugeMetricFamily("stage_a_queue_length", "Messages waiting on the stage-a queue (all runs).")
            q.add_metric([], length)
            yield q
        workers = self.store.queries.worker_beats(now, self.settings.heartbeat_timeout)
        online = GaugeMetricFamily("stage_a_workers_online", "Worker processes with a fresh heartbeat.")
        online.add_metric([], sum(1 for w in workers if w.online))
        yield online
        by_state = GaugeMetricFamily("stage_a_workers", "Worker processes by state.", labels=["state"])
        counts: dict[str, int] = {}
        for w in workers:
            counts[w.state] = counts.get(w.state, 0) + 1
        for s, n in sorted(counts.items()):
            by_state.add_metric([s], n)
        yield by_state
        total_dead = GaugeMetricFamily("stage_a_dead_letters", "Dead-lettered messages, all runs.")
        total_dead.add_metric([], sum(self.store.queries.dead_letter_counts().values()))
        yield total_dead


def metrics_registry(store: ResultStore, settings: Settings, queue: QueueProbe) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, settings, queue))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
