"""Recovery of lost work, driven by the store (which knows what is in flight) rather than the broker.

Three cases: a worker died holding leased images (its heartbeat stopped: a dead holder, found
within STAGE_A_HOLDER_TIMEOUT; or, without heartbeats, its lease expired), and messages vanished
from the broker (a Redis restart without persistence) leaving images pending with no activity. All
are re-enqueued, RESEND_CHUNK images per send (a pass stops at the first send that fails, and
failing passes back off); result writes are idempotent, so a rare
double delivery costs time, never a row. Each pass records its outcome in the host's `reclaimers`
row, so a reclaimer that keeps failing is named by `stage-a status`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from stage_a.errors import UserError, first_line
from stage_a.messages import payloads_for
from stage_a.outage import is_database_error
from stage_a.queue import TaskQueue
from stage_a.secrets import broker_error, hide_secrets, redact_url
from stage_a.settings import Settings
from stage_a.store import ResultStore, utcnow
from stage_a.work import WorkItem

log = logging.getLogger(__name__)

RESEND_CHUNK = 1000
"""Images claimed and sent at a time: a full or failing broker gets one such chunk per pass, not all."""
BACK_OFF_MAX_FACTOR = 8
"""A failing reclaimer waits twice as long after each failed pass, up to this x STAGE_A_RECLAIM_INTERVAL."""


@dataclass(frozen=True)
class ReclaimReport:
    expired: int
    orphaned: int
    dead_holders: int = 0
    """Images re-sent because their holder stopped beating."""
    restored: int = 0
    """Messages put back on their queue because the worker process holding them unacknowledged died."""


class Reclaimer:
    def __init__(self, settings: Settings, store: ResultStore | None = None,
                 clock: Callable[[], datetime] = utcnow, host: str | None = None) -> None:
        self.settings = settings
        self._store = store
        self.clock = clock
        """The time a pass judges leases, heartbeats and orphan grace by (tests move it instead of sleeping)."""
        self._queue: TaskQueue | None = None
        self.orphan_grace = settings.orphan_grace_seconds
        self.host = host or socket.gethostname()
        """The `reclaimers` row this reclaimer writes (one reclaimer per worker host)."""
        self.chunk = RESEND_CHUNK
        self.sleep: Callable[[float], None] = time.sleep

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
        """One pass, its outcome written to the host's `reclaimers` row (when the database answers).
        Each claim commits only once its messages are published; with the broker down nothing is
        recorded as re-sent and a UserError (one line, password hidden) says so."""
        try:
            report = self._pass()
        except Exception as exc:
            self._record(self.problem(exc))
            raise
        self._record(None)
        return report

    def _pass(self) -> ReclaimReport:
        now = self.clock()
        restored = self._restore_held()
        dead = self._release_dead_holders(now)
        expired = 0
        stale = self.store.stale_leases(now)
        if stale:
            # raises -> the leases not yet re-sent stay expired for the next pass
            expired = self._in_chunks(stale, lambda chunk: self.store.releasing(chunk, self.settings.lease_seconds, now))
            if expired:
                log.warning("re-enqueued %d images whose lease expired (worker died?)", expired)
        orphaned = 0
        idle = self._idle_runs()
        if idle:
            # claiming_orphans: only one of the reclaimers (one per worker host) re-sends each image.
            lost = self.store.orphaned_pending(self.orphan_grace, now=now, runs=idle)
            orphaned = self._in_chunks(lost, lambda chunk: self.store.claiming_orphans(chunk, self.orphan_grace, now))
            if orphaned:
                log.warning("re-enqueued %d pending images with no message on the broker", orphaned)
        return ReclaimReport(expired, orphaned, dead, restored)

    def _restore_held(self) -> int:
        """Messages a dead worker process held unacknowledged (its buffer, not yet leased) back on their queues."""
        try:
            restored = self.queue.restore_dead_holders()
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc, "cannot restore held messages on broker")) from None
        if restored:
            log.warning("restored %d messages held unacknowledged by offline worker processes", restored)
        return restored

    def _release_dead_holders(self, now: datetime) -> int:
        """Re-send the images leased by workers whose heartbeat is older than the holder timeout."""
        timeout = self.settings.holder_timeout_seconds
        if timeout is None:
            return 0
        held = self.store.dead_holder_leases(timeout, now)
        # raises -> what is not re-sent stays leased by the dead worker, for the next pass
        sent = self._in_chunks(held, lambda chunk: self.store.releasing_dead_holders(chunk, timeout, now))
        if sent:
            log.warning("re-enqueued %d images leased by offline workers (no heartbeat for %.0f s)", sent, timeout)
        return sent

    def _in_chunks(self, items: list[WorkItem],
                   claiming: Callable[[list[WorkItem]], AbstractContextManager[list[WorkItem]]]) -> int:
        """Claim and send ``items`` RESEND_CHUNK at a time, each chunk committed once sent; the first chunk
        the broker refuses (full, down) ends the pass, so a failing broker sees one chunk per pass."""
        sent = 0
        for start in range(0, len(items), self.chunk):
            with claiming(items[start:start + self.chunk]) as won:
                self._publish(won)
            sent += len(won)
        return sent

    def _publish(self, items: list[WorkItem]) -> None:
        if not items:
            return
        try:
            self._send(items)
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc, "cannot re-enqueue on broker")) from None

    def _send(self, items: list[WorkItem]) -> None:
        """The one place re-sent images go to the broker: chunks of each run (whole groups for per_group) to the
        queue of its run's model, naming this store."""
        runs: dict[int, tuple[str, str]] = {}  # run -> (queue, sharding mode)
        by_run: dict[int, list[WorkItem]] = {}
        for it in items:
            run_id = it.key.run_id
            if run_id not in runs:
                run = self.store.find_run(run_id)
                runs[run_id] = (self.queue.queue_for(run.route if run else None),
                                run.spec.sharding_mode if run else "per_image")
            by_run.setdefault(run_id, []).append(it)
        for run_id, some in by_run.items():
            queue, mode = runs[run_id]
            self.queue.send(payloads_for(sorted(some, key=lambda it: it.key), mode, self.store.store_id), queue)

    def _idle_runs(self) -> set[int]:
        """Unfinished runs whose queue has no message waiting and none delivered but unacknowledged: only their
        pending images can have lost their messages (a batch prefetched by a worker loading its model is not
        lost; a dead worker's are restored after the visibility timeout; a Redis restart wipes both). Judged
        per queue: a model no worker holds keeps its queue full, and must not stop recovery of the others.
        Runs without a route wait on the plain queue; any run's message may wait there too (queued before
        per-model queues, or re-queued by a worker that could not tell its run), so a busy plain queue
        leaves every run alone (every worker consumes it: it drains)."""
        plain = self.queue.queue_for(None)
        try:
            queue_of: dict[int, str] = {}
            for run_id in self.store.queries.unfinished_run_ids():
                run = self.store.find_run(run_id)
                if run is not None and run.farm:
                    queue_of[run_id] = self.queue.queue_for(run.route)
            queues = sorted(set(queue_of.values()) | {plain})
            waiting = {q for q, n in zip(queues, self.queue.lengths(queues), strict=True) if n}
            busy = waiting | self.queue.unacked_queues(set(queues) - waiting)
        except Exception as exc:
            raise UserError(broker_error(self.settings.broker_url, exc)) from None
        if plain in busy:
            return set()
        return {run_id for run_id, q in queue_of.items() if q not in busy}

    def problem(self, exc: BaseException) -> str:
        """One line for the `reclaimers` row and the log, passwords hidden."""
        if isinstance(exc, UserError):
            return hide_secrets(first_line(exc), self.settings.broker_url, self.settings.database_url)
        if is_database_error(exc):
            return (f"database {redact_url(self.settings.database_url)}: "
                    f"{hide_secrets(first_line(getattr(exc, 'orig', None) or exc), self.settings.database_url)}")
        return hide_secrets(first_line(exc, typed=True), self.settings.broker_url, self.settings.database_url)

    def _record(self, problem: str | None) -> None:
        """Best effort: with the database down the failure is only logged (the next good pass clears it)."""
        try:
            self.store.reclaimer_checked(self.host, problem[:2000] if problem else None, utcnow())
        except Exception as exc:
            log.debug("could not record the reclaimer pass: %s", self.problem(exc))

    def loop(self) -> None:
        """A pass every STAGE_A_RECLAIM_INTERVAL; after a failed pass the wait doubles (capped) so a full or
        down broker is not hammered, and the first good pass restores the interval."""
        interval = self.settings.reclaim_interval
        delay = interval
        while True:
            self.sleep(delay)
            try:
                self.once()
                delay = interval
            except Exception as exc:  # the broker or DB may be restarting; try again later
                delay = min(delay * 2, interval * BACK_OFF_MAX_FACTOR)
                log.warning("reclaim pass failed: %s; next pass in %.0f s", self.problem(exc), delay)
