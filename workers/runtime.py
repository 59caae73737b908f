"""A farm worker process without Celery: admit a buffer, lease, drive the step loop, renew leases.

The Celery task (workers/tasks.py) only hands buffers of JSON payloads to `WorkerRuntime.process`;
tests drive it directly against a real store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from stage_a.settings import Settings
from stage_a.store import ResultStore, RunInfo
from stage_a.work import WorkItem
from workers.admission import Admission, Admitted
from workers.serving import ModelHost, WrongModel
from workers.steploop import BatchDone, LoopHooks, StepLoop, worker_name

log = logging.getLogger(__name__)

HAND_BACK_BASE_S = 0.25
HAND_BACK_MAX_S = 5.0
"""Back-off after buffers that were all handed back (see WorkerRuntime._back_off)."""


class WorkerRuntime:
    """Per pool process: the store (created after fork), the model host, admission and the loop."""

    def __init__(self, settings: Settings, name: str | None = None, store: ResultStore | None = None) -> None:
        self.settings = settings
        self.store = store or ResultStore(settings.require_database())
        self.name = name or worker_name()
        device = "cuda:0" if settings.gpus else settings.device  # a pinned GPU is this process's cuda:0
        self.host = ModelHost(settings, device)
        self.admission = Admission(self.store, settings, self.name, serves=self.host.serves)
        self._loop: StepLoop | None = None
        self._publisher: Any = None
        self._handed_back_in_a_row = 0
        self.sleep: Callable[[float], None] = time.sleep

    def rename(self, name: str) -> None:
        self.name = self.admission.worker = name
        if self._loop is not None:
            self._loop.name = name

    def process(self, payloads: Sequence[Any]) -> Admitted:
        """Admit one buffer and process its work; every image's outcome is committed on return."""
        admitted = self.admission.admit(payloads)
        for run_id, items in admitted.work.items():
            run = self.admission.run(run_id)
            assert run is not None
            try:
                loop = self._loop_for(run)
            except WrongModel as exc:
                log.error("%s; handing its %d images back to the queue", exc, len(items))
                admitted.handed_back += [it.to_message() for it in items]
                continue
            # Lease after the model is loaded: the lease times the batch, not a cold start.
            self.store.lease([it.key for it in items], self.name, self.settings.lease_seconds)
            loop.run(run, items, hooks=LoopHooks(before_execute=self._renewer()))
        if admitted.handed_back:
            self.hand_back(admitted.handed_back)
        self._back_off(admitted)
        return admitted

    def _back_off(self, admitted: Admitted) -> None:
        """Sleep a little when a whole buffer went back to the queue, longer each time in a row.

        A pinned worker alone with another model's run would otherwise pop, hand back and pop the
        same messages again as fast as Redis answers. Capped at HAND_BACK_MAX_S; reset by work.
        """
        if admitted.handed_back and not admitted.work:
            self._handed_back_in_a_row += 1
            delay = min(HAND_BACK_MAX_S, HAND_BACK_BASE_S * 2 ** (self._handed_back_in_a_row - 1))
            log.info("nothing this worker serves in %d buffer(s) in a row; waiting %.2fs",
                     self._handed_back_in_a_row, delay)
            self.sleep(delay)
        elif admitted.work:
            self._handed_back_in_a_row = 0

    def _loop_for(self, run: RunInfo) -> StepLoop:
        engine = self.host.engine_for(run)
        if self._loop is None or self._loop.engine is not engine:
            self._loop = StepLoop(engine, self.store, self.name)
        return self._loop

    def _renewer(self) -> Any:
        """Renew leases of each batch about to run but the first (it was just leased).

        A group message spanning many model batches must not look abandoned to the reclaimer
        while it is worked on; renewal is best effort (a locked database must not fail a batch).
        """
        first = True

        def renew(items: list[WorkItem]) -> None:
            nonlocal first
            if first:
                first = False
                return
            try:
                self.store.renew([it.key for it in items], self.settings.lease_seconds)
            except Exception as exc:
                log.warning("lease renewal failed (%s); continuing", str(exc).splitlines()[0])

        return renew

    def hand_back(self, payloads: list[Any]) -> None:
        """Re-publish messages for another model's workers (no lease was taken: no attempt counted)."""
        from stage_a.broker import Publisher

        if self._publisher is None:
            self._publisher = Publisher(self.settings)
        try:
            self._publisher.publish(payloads)
        except Exception as exc:  # the images stay pending: the orphan reclaimer re-sends them
            log.error("could not hand %d messages back (%s); the reclaimer will re-send their images",
                      len(payloads), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        log.warning("handed %d messages back to the queue: their runs need another model than this worker's",
                    len(payloads))


__all__ = ["BatchDone", "WorkerRuntime"]
