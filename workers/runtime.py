"""A farm worker process without Celery: admit a buffer, lease, drive the step loop, renew leases,
keep the heartbeat row. workers/tasks.py hands it buffers of JSON payloads and reports the
per-message outcomes; tests drive it directly against a real store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.hosting import ModelHost, ModelMismatch, WrongModel
from engine.interface import Engine
from engine.steploop import BatchDone, LoopHooks, StepLoop, worker_name
from stage_a.errors import first_line
from stage_a.messages import payloads_for
from stage_a.outage import is_outage
from stage_a.settings import Settings
from stage_a.store import ResultStore, RunInfo
from stage_a.work import ImageKey, WorkItem
from workers import metrics
from workers.admission import Admission, Admitted, Fate, IntakeOutage

log = logging.getLogger(__name__)

HAND_BACK_BASE_S = 0.25
HAND_BACK_MAX_S = 5.0
"""Back-off after buffers that were all handed back (see WorkerRuntime._back_off)."""
OUTAGE_BASE_S = 1.0
OUTAGE_MAX_S = 30.0
"""Back-off before re-queuing a buffer that met a database or broker outage (doubling while it lasts)."""


SUCCESS_KINDS = ("done", "skipped", "handed_back")


@dataclass(frozen=True)
class Outcome:
    """What became of one message of a buffer (what Flower shows for its task)."""

    kind: str
    """done, failed (an image of it failed), rejected (dead letter), cancelled, skipped (already
    finished), handed_back (another model's workers take it), redelivered (re-queued after a
    database or broker outage: not the message's fault), refused (the checkpoint at the run's path on
    this host is not the run's model: left pending for the reclaimer, the worker's problem says why)."""
    run_id: int | None
    images: int = 0
    """Its images that ran through the model in this buffer."""
    seconds: float = 0.0
    """Its own share of the model batches it was in (not the buffer's time, not a model load)."""
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind in SUCCESS_KINDS


@dataclass
class Processed:
    """The outcome of one buffer: admission's counts and one Outcome per payload, in order."""

    admitted: Admitted
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(len(v) for v in self.admitted.work.values())


class Heartbeats:
    """This process's row in the store's workers table: its state, written on change and every interval.

    Best effort: monitoring never fails work, so a failed write is a warning.
    """

    def __init__(self, store: ResultStore, name: str, host: ModelHost, engine_kind: str) -> None:
        self.store = store
        self.name = name
        self.host = host
        self.engine_kind = engine_kind
        self.state = "starting"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def beat(self, state: str, *, started: bool = False, model: str | None = None, engine: str | None = None,
             problem: str | None = None) -> None:
        """``model``: the base model it holds (its route); ``problem``: why it cannot serve a run ("" clears)."""
        self.state = state
        self._write(lambda: self.store.heartbeat(
            self.name, state, model=model or self.host.serving or self.host.route, engine=engine or self.engine_kind,
            device=self.host.device, pinned=self.host.pinned is not None, started=started, problem=problem))

    def batch(self, batch: BatchDone, engine: Engine | None) -> None:
        """A model batch was recorded: the row says busy and counts it."""
        self.state = "busy"
        self._write(lambda: self.store.record_batch(
            self.name, run_id=batch.run_id, images=batch.images, seconds=batch.seconds,
            completion_tokens=batch.completion_tokens, model=self.host.serving,
            engine=engine.name if engine else None))

    def every(self, interval: float) -> None:
        """Re-write the current state every ``interval`` seconds (alive: ready between buffers, busy inside one)."""
        if interval <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                if self.state != "stopped":
                    self.beat(self.state)

        self._thread = threading.Thread(target=loop, name="stage-a-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.beat("stopped")

    def _write(self, write: Callable[[], None]) -> None:
        try:
            with self._lock:
                write()
        except Exception as exc:
            log.warning("heartbeat failed (%s)", first_line(exc))


class WorkerRuntime:
    """Per pool process: the store (created after fork), the model host, admission and the loop."""

    def __init__(self, settings: Settings, name: str | None = None, store: ResultStore | None = None) -> None:
        self.settings = settings
        self.store = store or settings.open_store()
        self.name = name or worker_name()
        device = "cuda:0" if settings.gpus else settings.device  # a pinned GPU is this process's cuda:0
        self.host = ModelHost(settings, device)
        self.admission = Admission(self.store, settings, self.name, serves=self.host.serves)
        self._loop: StepLoop | None = None
        self._queue: Any = None
        self._handed_back_in_a_row = 0
        self._outages_in_a_row = 0
        self.sleep: Callable[[float], None] = time.sleep
        self.heartbeats = Heartbeats(self.store, self.name, self.host, settings.engine)
        self._loads_seen = 0
        self._sampler: metrics.DeviceSampler | None = None

    def rename(self, name: str) -> None:
        if name == self.name:
            return
        self.name = self.admission.worker = self.heartbeats.name = name
        if self._loop is not None:
            self._loop.name = name

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, heartbeat_interval: float | None = None) -> None:
        """At process start, before any message: heartbeat, load the pinned model (an unpinned worker
        loads each run's on its first batch), heartbeat ready, then re-write the heartbeat every interval."""
        beat = self.heartbeats.beat
        beat("starting", started=True)
        if self.settings.checkpoint:
            beat("loading")
            engine = self.host.preload()
            beat("ready", model=self.host.serving, engine=engine.name)
        else:
            self.host.check_device()
            log.info("no STAGE_A_CHECKPOINT: each run's model is loaded on its first batch")
            beat("ready")
        self.heartbeats.every(self.settings.heartbeat_interval if heartbeat_interval is None else heartbeat_interval)
        self._note_load()
        metrics.set_ready(True)
        if self.settings.metrics_port:
            self._sampler = metrics.DeviceSampler(lambda: self.host.engine)
            self._sampler.start()

    def stop(self) -> None:
        """At shutdown: the heartbeat thread ends and the row says stopped."""
        if self._sampler is not None:
            self._sampler.stop()
        metrics.set_ready(False)
        self.heartbeats.stop()

    def _note_load(self) -> None:
        """A model was loaded since the last look: its load time and the device memory it took."""
        if self.host.loads != self._loads_seen:
            self._loads_seen = self.host.loads
            metrics.record_load(self.host.load_seconds, self.host.engine.name if self.host.engine else "")
            metrics.sample_device(self.host.engine)

    # ---- one buffer ---------------------------------------------------------------------------

    def process(self, payloads: Sequence[Any], queues: Sequence[str | None] | None = None) -> Processed:
        """Admit one buffer and process its work; every image's outcome is committed on return.

        Between model batches the loop asks the store whether the run was cancelled; a cancelled
        run's images not yet run are put back to pending (never run, never re-enqueued). ``queues``: the
        queue each payload came from (a buffer re-queued after an outage goes back where it was)."""
        processed = self._process(payloads, queues)
        metrics.record_messages([o.kind for o in processed.outcomes])
        return processed

    def _process(self, payloads: Sequence[Any], queues: Sequence[str | None] | None) -> Processed:
        self.heartbeats.state = "busy"
        try:
            admitted = self.admission.admit(payloads)
        except IntakeOutage as exc:
            self.heartbeats.state = "ready"
            return self._after_outage(payloads, exc.fates, exc.cause, queues=queues)
        results: dict[ImageKey, tuple[str | None, float]] = {}  # key -> (error or None, its seconds)
        not_run: dict[ImageKey, str] = {}
        refusals: dict[int, str] = {}  # run -> why the model at its path here is not the run's
        served = False  # some run of the buffer went to a model (not all handed back)

        def collect(batch: BatchDone) -> None:
            share = batch.seconds / batch.images if batch.images else 0.0
            for r in batch.results:
                results[r.key] = (None if r.ok else (r.error or "empty summary"), share)
            if batch.reused:  # taken from the store: no model ran, no batch to count or time
                return
            engine = self._loop.engine if self._loop is not None else None
            self.heartbeats.batch(batch, engine)
            run = self.admission.known_run(batch.run_id)
            metrics.record_batch(batch, run.spec.mission if run else "", self.host.serving,
                                 engine.name if engine else None)

        fault: BaseException | None = None
        for run_id, items in admitted.work.items():
            run = self.admission.run(run_id)
            assert run is not None
            try:
                loop = self._loop_for(run)
            except ModelMismatch as exc:
                # Not handed back: its queue is this worker's own, and the model at the path stays wrong here.
                log.error("%s; not serving its %d images here (the reclaimer re-sends them later)", exc, len(items))
                self.heartbeats.beat("ready", problem=str(exc))
                not_run.update({it.key: "refused" for it in items})
                refusals[run_id] = str(exc)
                continue
            except WrongModel as exc:
                log.error("%s; handing its %d images back to the queue", exc, len(items))
                self.heartbeats.beat("ready", problem=str(exc))
                admitted.handed_back += payloads_for(items, run.spec.sharding_mode, self.store.store_id)
                not_run.update({it.key: "handed_back" for it in items})
                continue
            served = True
            try:
                self._run_one(run, items, loop, collect, results, not_run)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                fault = exc  # what is not committed is delivered again, not left to the lease
                break
        if fault is not None:
            self.heartbeats.state = "ready"
            unsettled: list[Fate | None] = [
                None if f.kind == "work" and any(k not in results and k not in not_run for k in f.keys) else f
                for f in admitted.messages]
            processed = self._after_outage(payloads, unsettled, fault, results, not_run, queues)
            if admitted.handed_back:
                self.hand_back(admitted.handed_back)
            return processed
        self._outages_in_a_row = 0
        if admitted.handed_back:
            self.hand_back(admitted.handed_back)
        self._back_off(admitted, served)
        self.heartbeats.state = "ready"
        return Processed(admitted, [self._outcome(f, results, not_run, refusals) for f in admitted.messages])

    def _run_one(self, run: RunInfo, items: list[WorkItem], loop: StepLoop, collect: Callable[[BatchDone], None],
                 results: dict[ImageKey, tuple[str | None, float]], not_run: dict[ImageKey, str]) -> None:
        """Lease one run's images of the buffer and drive them through the loop (results via ``collect``)."""
        # Lease after the model is loaded: the lease times the batch, not a cold start.
        self.store.lease([it.key for it in items], self.name, self.settings.lease_seconds)
        hooks = LoopHooks(before_execute=self._renewer(), after_batch=collect, stop=self._cancelled(run.id))
        loop.run(run, items, hooks=hooks)
        left = [it.key for it in items if it.key not in results]
        if left:  # the loop stopped: the run was cancelled mid-buffer
            self.store.unlease(left)
            not_run.update({k: "cancelled" for k in left})
            log.warning("run %d cancelled: %d images of this buffer not run", run.id, len(left))

    def _after_outage(self, payloads: Sequence[Any], fates: list[Fate | None], cause: BaseException,
                      results: dict[ImageKey, tuple[str | None, float]] | None = None,
                      not_run: dict[ImageKey, str] | None = None,
                      queues: Sequence[str | None] | None = None) -> Processed:
        """The database or broker failed: after a back-off (doubling while outages follow each other), the
        messages not settled (fate None) are delivered again, never dead-lettered. celery-batches
        acknowledges the buffer when the task returns, so they are re-published, not left unacknowledged;
        if that fails too their images stay pending and the orphan reclaimer re-sends them."""
        self._outages_in_a_row += 1
        delay = min(OUTAGE_MAX_S, OUTAGE_BASE_S * 2 ** (self._outages_in_a_row - 1))
        again = [i for i, f in enumerate(fates) if f is None]
        log.error("database or broker unavailable (%s): not the messages' fault; re-queuing %d of %d messages "
                  "in %.1fs", first_line(cause, typed=True), len(again), len(payloads), delay)
        self.sleep(delay)
        if again and self._send([payloads[i] for i in again], "re-queue",
                                [queues[i] for i in again] if queues is not None else None):
            log.warning("re-queued %d messages after the outage", len(again))
        reason = f"re-queued after an outage ({first_line(cause, typed=True)[:200]})"
        outcomes = [Outcome("redelivered", _run_of(p), reason=reason) if f is None
                    else self._outcome(f, results or {}, not_run or {}) for p, f in zip(payloads, fates, strict=True)]
        return Processed(Admitted(), outcomes)

    @staticmethod
    def _outcome(fate: Any, results: dict[ImageKey, tuple[str | None, float]], not_run: dict[ImageKey, str],
                 refusals: dict[int, str] | None = None) -> Outcome:
        if fate.kind != "work":
            return Outcome(fate.kind, fate.run_id, reason=fate.reason)
        ran = [results[k] for k in fate.keys if k in results]
        seconds = sum(s for _, s in ran)
        errors = [e for e, _ in ran if e is not None]
        if fate.failed:
            errors.insert(0, fate.reason or "failed at admission")
        if errors:
            return Outcome("failed", fate.run_id, len(ran), seconds,
                           f"{len(errors)} image(s) failed: {errors[0]}" if len(errors) > 1 else errors[0])
        skipped = {not_run[k] for k in fate.keys if k in not_run}
        if "cancelled" in skipped:
            return Outcome("cancelled", fate.run_id, len(ran), seconds, "run cancelled")
        if skipped == {"handed_back"}:
            return Outcome("handed_back", fate.run_id, reason="needs another model")
        if "refused" in skipped:
            return Outcome("refused", fate.run_id, len(ran), seconds,
                           (refusals or {}).get(fate.run_id, "the model at the run's path differs here"))
        return Outcome("done", fate.run_id, len(ran), seconds)

    def _cancelled(self, run_id: int) -> Any:
        def stop() -> bool:
            try:
                return self.store.is_cancelled(run_id)
            except Exception:  # a database hiccup must not stop a batch; the next check decides
                return False

        return stop

    def _back_off(self, admitted: Admitted, served: bool) -> None:
        """Sleep when a whole buffer went back to the queue, twice as long each time in a row (capped at
        HAND_BACK_MAX_S; reset by work): a worker alone with runs it cannot serve would otherwise pop and
        hand back the same messages as fast as Redis answers."""
        if admitted.handed_back and not served:
            self._handed_back_in_a_row += 1
            delay = min(HAND_BACK_MAX_S, HAND_BACK_BASE_S * 2 ** (self._handed_back_in_a_row - 1))
            log.info("nothing this worker serves in %d buffer(s) in a row; waiting %.2fs",
                     self._handed_back_in_a_row, delay)
            self.sleep(delay)
        elif served:
            self._handed_back_in_a_row = 0

    def _loop_for(self, run: RunInfo) -> StepLoop:
        engine = self.host.engine_for(run)
        self._note_load()
        if self._loop is None or self._loop.engine is not engine:
            self._loop = StepLoop(engine, self.store, self.name, data_dir=self.settings.data_dir,
                                  precheck=self.settings.reuse_precheck)
        return self._loop

    def _renewer(self) -> Any:
        """Renew the leases of each batch about to run but the first (just leased), so a long group message
        does not look abandoned to the reclaimer; best effort (a locked database must not fail a batch)."""
        first = True

        def renew(items: list[WorkItem]) -> None:
            nonlocal first
            if first:
                first = False
                return
            try:
                self.store.renew([it.key for it in items], self.settings.lease_seconds)
            except Exception as exc:
                log.warning("lease renewal failed (%s); continuing", first_line(exc))

        return renew

    def hand_back(self, payloads: list[Any]) -> None:
        """Re-publish messages to the queue of their run's model (no lease was taken: no attempt counted).
        Routing keeps this rare: a message reaches a worker of another model only from the plain queue."""
        if self._send(payloads, "hand back"):
            log.warning("handed %d messages back to the queue: their runs need another model than this worker's",
                        len(payloads))

    def _send(self, payloads: list[Any], doing: str, queues: Sequence[str | None] | None = None) -> bool:
        """The one place this process puts messages back on the broker, each to ``queues[i]`` (the queue it
        came from) or else to the queue of its run's model as admission last read it (never a database read:
        this runs during outages). False (logged) when it cannot: the images stay pending and the orphan
        reclaimer re-sends them."""
        from stage_a.queue import TaskQueue

        if self._queue is None:
            self._queue = TaskQueue(self.settings)
        by_queue: dict[str, list[Any]] = {}
        for i, payload in enumerate(payloads):
            queue = queues[i] if queues is not None else None
            if queue is None:
                run_id = _run_of(payload)
                run = self.admission.known_run(run_id) if run_id is not None else None
                queue = self._queue.queue_for(run.route if run else None)
            by_queue.setdefault(queue, []).append(payload)
        try:
            for queue, some in by_queue.items():
                self._queue.send(some, queue)
        except Exception as exc:
            log.error("could not %s %d messages (%s); the reclaimer will re-send their images",
                      doing, len(payloads), first_line(exc))
            return False
        return True


def _run_of(payload: Any) -> int | None:
    if isinstance(payload, dict) and type(payload.get("run_id")) is int:
        return int(payload["run_id"])
    return None


__all__ = ["BatchDone", "Outcome", "Processed", "WorkerRuntime"]
