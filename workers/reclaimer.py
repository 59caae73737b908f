"""Recovery of lost work, driven by the store (which knows what is in flight) rather than the broker.

Two cases: a worker died holding leased images (lease expired), and messages vanished from the
broker (a Redis restart without persistence) leaving images pending with no activity. Both are
re-enqueued; result writes are idempotent, so a rare double delivery costs time, never a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from stage_a.errors import UserError, first_line
from stage_a.messages import payloads_for
from stage_a.queue import TaskQueue
from stage_a.secrets import broker_error
from stage_a.settings import Settings
from stage_a.store import ResultStore, utcnow
from stage_a.work import WorkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReclaimReport:
    expired: int
    orphaned: int


class Reclaimer:
    def __init__(self, settings: Settings, store: ResultStore | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self._store = store
        self.clock = clock
        """The time a pass judges lease expiry and orphan grace by (tests move it instead of sleeping)."""
        self._queue: TaskQueue | None = None
        self.orphan_grace = settings.orphan_grace_seconds

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = self.settings.open_store()
        return self._store

    @property
    def queue(self) -> TaskQueue:
        if self._queue is None:
            self._queue = TaskQueue(self.settings)
        return self._queue

    def once(self) -> ReclaimReport:
        """One pass. Each claim commits only once its messages are published; with the broker down
        nothing is recorded and a UserError (one line, password hidden) says so."""
        now = self.clock()
        stale = self.store.stale_leases(now)
        expired = 0
        if stale:
            with self.store.releasing(stale, self.settings.lease_seconds, now) as won:
                self._publish(won)  # raises -> the leases stay expired for the next pass
            expired = len(won)
            if won:
                log.warning("re-enqueued %d images whose lease expired (worker died?)", expired)
        orphaned = 0
        if self._broker_idle():
            # claiming_orphans: only one of the reclaimers (one per worker host) re-sends each image.
            with self.store.claiming_orphans(self.store.orphaned_pending(self.orphan_grace, now=now),
                                             self.orphan_grace, now) as lost:
                self._publish(lost)
            orphaned = len(lost)
            if lost:
                log.warning("re-enqueued %d pending images with no message on the broker", orphaned)
        return ReclaimReport(expired, orphaned)

    def _publish(self, items: list[WorkItem]) -> None:
        """Re-send ``items``, each to the queue of its run's model."""
        if not items:
            return
        by_queue: dict[str, list[WorkItem]] = {}
        for it in items:
            run = self.store.find_run(it.key.run_id)
            by_queue.setdefault(self.queue.queue_for(run.route if run else None), []).append(it)
        try:
            for queue, some in by_queue.items():
                self.queue.send(payloads_for(some, "per_image", self.store.store_id), queue)
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc, "cannot re-enqueue on broker")) from None

    def _broker_idle(self) -> bool:
        """No message waits in the queue and none is delivered but unacknowledged: only then can a pending
        image have lost its message (a batch prefetched by a worker loading its model is not lost; a dead
        worker's are restored after the visibility timeout; a Redis restart wipes both)."""
        try:
            queues = [self.queue.queue_for(None)] + [self.queue.queue_for(w.route)
                                                     for w in self.store.queries.routes_with_work()]
            return sum(self.queue.lengths(queues)) == 0 and not self.queue.has_unacked(queues)
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc)) from None

    def loop(self) -> None:
        while True:
            time.sleep(self.settings.reclaim_interval)
            try:
                self.once()
            except Exception as exc:  # the broker or DB may be restarting; try again next round
                log.warning("reclaim check failed: %s", first_line(exc))
