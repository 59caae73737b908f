"""The batch task: celery-batches buffers messages, one pool process per GPU runs them.

celery-batches acknowledges every message of a batch when the pool call returns, whether it
succeeded or raised; so every image's result or failure is committed to the store here before
returning, and a crash (which never returns) is recovered by the store's leases, not the broker.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from celery import signals
from celery_batches import Batches, SimpleRequest

from stage_a.errors import EngineDeadError
from stage_a.settings import FarmSettings
from stage_a.store import ResultStore, RunInfo
from stage_a.store.models import DONE
from stage_a.work import ImageResult, WorkItem
from workers.celery import app, settings
from workers.images import ImageError, resolve_under_root
from workers.messages import PoisonMessage, parse_payload

log = logging.getLogger(__name__)
TASK_NAME = "stage_a.summarize"


class WorkerRuntime:
    """Per pool process: the store (created after fork) and the engine (loaded on first batch)."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.store = ResultStore(settings.require_database())
        self._runner: Any = None
        self._runs: dict[int, RunInfo | None] = {}
        from workers.runner import worker_name

        self.name = worker_name()

    def runner(self, run: RunInfo | None = None) -> Any:
        if self._runner is None:
            from stage_a.config import default_cache_dir
            from workers.engines import load_engine
            from workers.runner import BatchRunner

            # The host's STAGE_A_CHECKPOINT wins; otherwise serve the checkpoint the run was enqueued with.
            checkpoint = self.settings.checkpoint or (run.spec.checkpoint if run else "")
            if not checkpoint:
                from workers.tiny_model import cached_tiny_checkpoint

                log.warning("STAGE_A_CHECKPOINT not set: using the tiny random-weight demo model")
                checkpoint = str(cached_tiny_checkpoint(default_cache_dir() / "models"))
            device = "cuda:0" if self.settings.gpus else self.settings.device
            self.checkpoint = checkpoint
            engine = load_engine(self.settings.engine, checkpoint, device)
            self._runner = BatchRunner(engine, self.store, self.name)
        return self._runner

    def run_info(self, run_id: int) -> RunInfo | None:
        if run_id not in self._runs:
            run = self.store.find_run(run_id)
            self._runs[run_id] = run
            if run and run.spec.checkpoint and self.settings.checkpoint and \
                    os.path.realpath(run.spec.checkpoint) != os.path.realpath(self.settings.checkpoint):
                log.warning("run %d was enqueued with checkpoint %s but this worker serves %s",
                            run_id, run.spec.checkpoint, self.settings.checkpoint)
        return self._runs[run_id]

    def _allowed_root(self, run: RunInfo) -> bool:
        roots = self.settings.input_roots
        if not roots:
            return True
        real = os.path.realpath(run.spec.input_root)
        return any(os.path.commonpath([os.path.realpath(r), real]) == os.path.realpath(r) for r in roots)

    def _dead(self, reason: str, payload: Any) -> None:
        log.error("rejected message: %s", reason)
        try:
            text = json.dumps(payload, ensure_ascii=False, default=repr)
        except Exception:
            text = repr(payload)
        self.store.dead_letter(reason, text, self.name)

    def accept(self, payloads: list[Any]) -> dict[int, list[WorkItem]]:
        """Validate messages into work items by run; poison goes to the dead-letter table."""
        by_run: dict[int, dict[Any, WorkItem]] = {}
        for payload in payloads:
            try:
                items = parse_payload(payload)
                run = self.run_info(items[0].key.run_id)
                if run is None:
                    raise PoisonMessage(f"unknown run {items[0].key.run_id}")
                if not self._allowed_root(run):
                    raise PoisonMessage(f"run {run.id} input root is outside STAGE_A_INPUT_ROOTS")
                for it in items:
                    try:
                        resolve_under_root(it.rel_path, run.spec.input_root)
                    except ImageError as exc:
                        raise PoisonMessage(str(exc)) from None
            except PoisonMessage as exc:
                self._dead(str(exc), payload)
                continue
            for it in items:
                by_run.setdefault(it.key.run_id, {})[it.key] = it  # duplicates in one buffer collapse
        return {run_id: sorted(d.values(), key=lambda it: it.key) for run_id, d in by_run.items()}

    def process(self, payloads: list[Any]) -> int:
        processed = 0
        for run_id, items in self.accept(payloads).items():
            run = self.run_info(run_id)
            assert run is not None
            todo, gave_up = self._filter(items)
            if gave_up:
                self.store.record_results(gave_up, self.name)
            if not todo:
                continue
            # Load the model before leasing: the lease must time the batch, not a cold start
            # (a first load longer than STAGE_A_LEASE_SECONDS made the reclaimer re-enqueue
            # images that were never started, and every re-enqueue counts as a delivery).
            self.runner()
            self.store.lease([it.key for it in todo], self.name, self.settings.lease_seconds)
            processed += self._run_batches(run, todo)
        return processed

    def _filter(self, items: list[WorkItem]) -> tuple[list[WorkItem], list[ImageResult]]:
        """Skip images already done (redelivery); fail images that keep killing workers."""
        state = self.store.attempts([it.key for it in items])
        todo, gave_up = [], []
        for it in items:
            status, attempts = state.get(it.key, ("missing", 0))
            if status in (DONE, "missing"):
                if status == "missing":
                    self._dead(f"image {it.key} is not in run {it.key.run_id}", it.to_message())
                continue
            if attempts >= self.settings.max_delivery_attempts:
                reason = f"gave up after {attempts} deliveries without a result"
                gave_up.append(ImageResult(key=it.key, error=reason))
                # Also a dead letter: a message that kills workers is poison like a malformed one.
                self._dead(f"image {it.key}: {reason}", it.to_message())
            else:
                todo.append(it)
        return todo, gave_up

    def _run_batches(self, run: RunInfo, items: list[WorkItem]) -> int:
        from workers.prefetch import Prefetcher

        runner = self.runner(run)
        ctx = runner.context(run)
        done = 0
        first = True
        with Prefetcher(lambda b: runner.engine.prepare(ctx, b), runner.batches(run, items)) as pf:
            batches = iter(pf)
            while True:
                try:
                    prepared = next(batches)
                except StopIteration:
                    break
                except EngineDeadError:
                    raise
                except Exception as exc:  # a bug in preparation: fail what is left, never lose it
                    log.exception("preparing a batch failed")
                    left = [it for it in items if it.key not in self._finished(items)]
                    self.store.record_results([ImageResult(key=it.key, error=f"internal error: {exc}")
                                               for it in left], self.name)
                    return done + len(left)
                # Renew the lease of what is about to run: a group message spanning many model
                # batches must not look abandoned to the reclaimer while it is still being worked on.
                # The first batch was just leased; renewal is best effort (a locked DB must not fail it).
                if first:
                    first = False
                else:
                    try:
                        self.store.renew([it.key for it in prepared.items], self.settings.lease_seconds)
                    except Exception as exc:
                        log.warning("lease renewal failed (%s); continuing", str(exc).splitlines()[0])
                try:
                    done += len(runner.execute(prepared))
                except EngineDeadError:
                    raise
                except Exception as exc:
                    log.exception("generation failed for a batch of %d", len(prepared.items))
                    rows = [ImageResult(key=it.key, error=f"internal error: {str(exc).splitlines()[0]}")
                            for it in prepared.items] + prepared.failed
                    self.store.record_results(rows, self.name)
                    done += len(rows)
        return done

    def _finished(self, items: list[WorkItem]) -> set[Any]:
        state = self.store.attempts([it.key for it in items])
        return {k for k, (st, _) in state.items() if st in (DONE, "failed")}


class ReconnectSafeBatches(Batches):
    """Batches whose interval flush survives a broker reconnect.

    celery-batches 0.11 arms its repeating flush timer once, on the first message, and keeps the
    handle on the (long-lived) task. A lost broker connection makes Celery clear the consumer's
    timer and rebuild the strategy, but the stale handle stays set, so the timer is never armed
    again: a partial batch (fewer than flush_every messages, e.g. the orphans re-sent after a
    Redis restart) then sits unacknowledged until the broker's visibility timeout
    (clokep/celery-batches#107, fixed upstream by #108). Strategy() runs at every consumer
    (re)start: re-arm there, at once, so requests buffered before the reconnect flush too.
    """

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        handler = super().Strategy(task, app, consumer)
        stale: Any = getattr(self, "_tref", None)
        if stale is not None:
            stale.cancel()
        # An empty buffer cancels this timer on its first tick; the next message re-arms it.
        self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        return handler


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(FarmSettings.from_env())
    return _runtime


@app.task(base=ReconnectSafeBatches, name=TASK_NAME, flush_every=settings.batch_size, flush_interval=settings.flush_interval,
          acks_late=True, ignore_result=True)
def summarize(requests: list[SimpleRequest]) -> int:
    """Summarize the buffered images (one JSON payload per message) and commit their results."""
    payloads = [r.args[0] if len(r.args) == 1 else {"bad_args": list(r.args)} for r in requests]
    rt = runtime()
    if requests and requests[0].hostname:
        rt.name = f"{requests[0].hostname}:{os.getpid()}"  # the node name Flower shows
    t0 = time.monotonic()
    try:
        processed = rt.process(payloads)
    except EngineDeadError as exc:
        # Exit without returning: nothing is acknowledged, leases expire, the reclaimer re-enqueues.
        log.critical("engine dead, exiting process: %s", exc)
        os._exit(70)
    _send_task_events(requests, time.monotonic() - t0)
    return processed


def _send_task_events(requests: list[SimpleRequest], runtime_s: float) -> None:
    """celery-batches sends no per-task events; send received/succeeded so Flower lists the tasks."""
    if not settings.task_events or not requests:
        return
    try:
        with app.events.default_dispatcher(hostname=requests[0].hostname) as dispatcher:
            for r in requests:
                dispatcher.send("task-received", uuid=r.id, name=r.name, args=repr(r.args)[:200], kwargs="{}",
                                retries=0, eta=None, root_id=r.id, parent_id=None)
                dispatcher.send("task-succeeded", uuid=r.id, result="stored", runtime=runtime_s)
    except Exception as exc:  # monitoring must never fail a batch whose results are committed
        log.warning("could not send task events: %s", exc)


@signals.worker_process_init.connect
def _pin_gpu(**_: Any) -> None:
    """Before torch touches CUDA: process i of this host sees only GPU STAGE_A_GPUS[i]."""
    global _runtime
    _runtime = None  # never inherit a parent's engine or DB connections across fork
    if not settings.gpus:
        return
    from billiard.process import current_process

    index = getattr(current_process(), "index", 0) or 0
    gpu = settings.gpus[index % len(settings.gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("pool process %d pinned to GPU %s", index, gpu)


@signals.worker_init.connect
def _check_services(**_: Any) -> None:
    """Fail within seconds, with one line, when Redis or the database cannot be reached at start.

    Celery itself retries the broker forever (right for a Redis restart mid-run, wrong for a
    mistyped URL), and the database is first touched on the first batch: without this check a
    worker with a wrong URL hangs silently. Exit status 2 like the CLI; a supervisor (systemd
    Restart=always) restarts the worker, so a server that is merely late is still waited for.
    Messages name URLs with their password redacted.
    """
    import sys

    from stage_a.config import redact_url
    from stage_a.errors import UserError

    try:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=5)
        except Exception as exc:
            raise UserError(f"cannot reach broker {redact_url(settings.broker_url)}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        ResultStore(settings.require_database()).close()  # connects and migrates to head
    except UserError as exc:
        sys.stderr.write(f"stage-a worker: error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


@signals.worker_ready.connect
def _start_reclaimer(sender: Any = None, **_: Any) -> None:
    """Each worker host also runs the recovery loop: a surviving worker rescues a dead one's work."""
    from producer.reclaim import Reclaimer

    reclaimer = Reclaimer(settings)
    thread = threading.Thread(target=reclaimer.loop, name="stage-a-reclaimer", daemon=True)
    thread.start()


__all__ = ["TASK_NAME", "summarize"]
