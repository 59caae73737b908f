"""The batch task: celery-batches buffers messages, one pool process per GPU runs them.

celery-batches acknowledges a batch's messages when the pool call returns, raised or not: every
image's result or failure is committed before returning, and a crash (no return) is recovered by
the store's leases. Each pool process pins its GPU and loads its model in worker_process_init, the
one hook that runs in every pool process before it takes a batch (CUDA cannot cross a fork);
worker_proc_alive_timeout is raised to STAGE_A_MODEL_LOAD_TIMEOUT for it, and the consumer fetches
nothing until every pool process has loaded (WaitForModels). Pool processes report to the main
process through two multiprocessing values made before the pool forks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from celery import bootsteps, signals
from celery_batches import Batches, SimpleRequest

from stage_a.errors import EngineDeadError, UserError, first_line
from stage_a.held import HeldMessages
from stage_a.messages import TASK_NAME, image_count
from workers import metrics
from workers.celery import app, refuse_to_start, settings
from workers.naming import process_name, set_node
from workers.routing import ModelRouter
from workers.runtime import Outcome, WorkerRuntime

log = logging.getLogger(__name__)

IDLE_CHECK = 0.05
"""Seconds between looks for an idle pool process that a partial buffer could feed now."""

_loaded = multiprocessing.Value("i", 0)
"""Pool processes that finished loading their model; WaitForModels waits for all of them."""
_fatal = multiprocessing.Value("i", 0)
"""The worker's exit status when a pool process cannot serve (a configuration error), else 0."""
_node: str | None = None
"""This worker's node name (-n), read in the main process before the pool forks."""
_processes = 1
"""This worker's pool processes (--concurrency), read in the main process before the pool forks."""


class ReconnectSafeBatches(Batches):
    """Batches that flush by images, spread a draining queue's last work over the pool processes,
    re-arm their interval flush after a broker reconnect, and refuse malformed bodies.

    - A message is a chunk of images (stage_a/messages.py): the buffer is flushed once it holds
      ``flush_images`` images (celery-batches' own count of messages, ``flush_every``, is set out of
      reach), or by the interval timer.
    - A flush is one pool call while the work visible to this worker (the buffer plus the images
      waiting on its queues) holds a full flush for every pool process; past that point (a run's
      end) it is cut, between messages, into one even share per pool process (the prefork pool
      gives a call to an idle process first), so no process sits idle while another holds the rest.
    - A partial buffer is flushed at once, not at the interval, when a pool process is idle and waiting
      would bring nothing more: the prefetch window is full (nothing more is fetched until a running
      call returns) or this worker's queues are empty. Checked on every message and every IDLE_CHECK
      seconds (a pool call that returns frees a process; its result marks it in this process).
    - celery-batches 0.11 keeps its flush timer's handle (`_tref`) on the task; a reconnect clears
      the consumer's timer but not the handle, so a partial batch would wait for the visibility
      timeout (clokep/celery-batches#107; the fix, #108, is in no release). Strategy() runs at every
      (re)connect and re-arms it.
    Pinned to 0.11; tests/test_library_internals.py checks the shape of what is relied on.
    """

    flush_images = 1
    """Images that make a full buffer (set from STAGE_A_FLUSH_SIZE on the task)."""
    _buffered = 0
    _last_images = 1
    _consumer: Any = None
    _calls: list[Any] = []
    """Pool calls made by this worker that have not returned (billiard ApplyResults)."""
    _idle_tref: Any = None
    _held_tref: Any = None
    _holding: dict[str, Any]
    """Delivery tag -> message of what this process named as held and has not seen acknowledged."""
    _held: HeldMessages | None = None
    """This process's delivered, unacknowledged messages named on the broker (stage_a.held); None: off."""

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        handler = super().Strategy(task, app, consumer)
        for stale in (getattr(self, "_tref", None), self._idle_tref, self._held_tref):
            if stale is not None:
                stale.cancel()
        # An empty buffer cancels this timer on its first tick; the next message re-arms it.
        self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        self._idle_tref = consumer.timer.call_repeatedly(IDLE_CHECK, self._flush_if_idle)
        self._consumer = consumer
        if "_calls" not in vars(self):  # this task's own list, kept across reconnects (those calls still run)
            self._calls = []
            self._holding = {}
            ttl = settings.holder_timeout_seconds
            transport = getattr(getattr(consumer, "connection", None), "transport", None)
            if ttl is not None and getattr(transport, "driver_type", "") == "redis":
                self._held = HeldMessages(settings.queue, process_name(), ttl)
        if self._held is not None:
            # A (re)connect: kombu put back what the old channel held unacknowledged; name none of it.
            self._holding.clear()
            self._forget_held()
            self._held_tref = consumer.timer.call_repeatedly(max(0.5, self._held.ttl_ms / 4000), self._beat_held)

        def checked_handler(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
            # celery-batches unpacks the body as [args, kwargs, embed] when it flushes, in the
            # timer, where any other body raises and takes every buffered message with it. It is
            # refused here, as one message: workers.poison dead-letters it.
            if body is None:
                check_task_message(message)
            self._hold(message)
            out = handler(message, body, *args, **kwargs)
            self._last_images = message_images(message)
            self._buffered += self._last_images
            if self._buffered >= self.flush_images:
                self._do_flush()
            else:
                self._flush_if_idle()
            return out

        return checked_handler

    def flush(self, requests: Any) -> Any:
        """One pool call per share of the buffer (see the class); called by celery-batches' _do_flush."""
        self._buffered = 0
        requests = list(requests)
        sizes = [image_count(_payload_of(r)) for r in requests]
        result = None
        share = self._share(sum(sizes))
        log.debug("flushing %d messages, %d images, at most %d per pool call", len(requests), sum(sizes), share)
        for piece in split_flush(requests, sizes, share):
            result = super().flush(piece)
            if result is not None:
                self._calls.append(result)
        return result

    def _hold(self, message: Any) -> None:
        """Name the message on the broker as this process's, so a reclaimer restores it if the process dies."""
        tag = getattr(message, "delivery_tag", None)
        if self._held is None or not isinstance(tag, str):
            return
        self._holding[tag] = message
        try:
            with app.pool.acquire(block=True, timeout=1) as conn:
                self._held.received(conn.default_channel.client, tag)
        except Exception as exc:  # unnamed: kombu restores it after the visibility timeout, as before
            log.warning("could not name a held message on the broker (%s)", first_line(exc))

    def _beat_held(self) -> None:
        """Keep this process's held messages alive on the broker; forget those acknowledged."""
        if self._held is None:
            return
        acked = [tag for tag, m in self._holding.items() if m.acknowledged]
        try:
            with app.pool.acquire(block=True, timeout=1) as conn:
                self._held.beat(conn.default_channel.client, acked)
        except Exception as exc:
            log.warning("could not refresh the held messages on the broker (%s)", first_line(exc))
            return
        for tag in acked:
            del self._holding[tag]

    def _forget_held(self) -> None:
        if self._held is None:
            return
        try:
            with app.pool.acquire(block=True, timeout=1) as conn:
                self._held.forget(conn.default_channel.client)
        except Exception as exc:
            log.warning("could not clear the held messages on the broker (%s)", first_line(exc))

    def _flush_if_idle(self) -> None:
        """Flush a partial buffer now when a pool process is idle and waiting would bring no more work."""
        if self._buffered and self._idle() and (not self._can_fetch() or self._waiting() == 0):  # None: unknown
            self._do_flush()

    def _idle(self) -> int:
        """Pool processes without a call of this worker's (a pool that returns no results counts as idle)."""
        self._calls = [c for c in self._calls if not _returned(c)]
        return max(0, _concurrency(self._consumer) - len(self._calls))

    def _can_fetch(self) -> bool:
        """Whether the consumer may take more messages now (False: its prefetch window is full of unacked
        ones, and no more arrive until a running call returns and acks its messages)."""
        try:
            return bool(self._consumer.task_consumer.channel.qos.can_consume())
        except AttributeError:  # a transport without kombu's virtual QoS: assume more may come
            return True

    def _share(self, buffered: int) -> int:
        """The most images one pool call gets: the whole buffer while the work visible to this worker (the
        buffer and its queues) would give every pool process a full flush, else an even share of the buffer."""
        processes = _concurrency(self._consumer)
        if processes <= 1 or buffered + (self._waiting() or 0) >= processes * self.flush_images:
            return buffered
        return -(-buffered // processes)

    def _waiting(self) -> int | None:
        """Images still on this worker's queues, estimated from their lengths (one round trip on a pooled
        connection) and the latest message's images (chunks only shrink along a run); None when the broker
        does not say."""
        try:
            names = [q.name for q in self._consumer.task_consumer.queues]
            with app.pool.acquire(block=True, timeout=1) as conn:  # never the consumer's own connection
                if getattr(conn.transport, "driver_type", "") != "redis":
                    return None
                pipe = conn.default_channel.client.pipeline(transaction=False)
                for name in names:
                    pipe.llen(name)
                return sum(int(n) for n in pipe.execute()) * self._last_images
        except Exception as exc:  # unknown: shares stay correct, only smaller; no early flush
            log.debug("queue lengths unavailable (%s)", first_line(exc))
            return None


def _concurrency(consumer: Any) -> int:
    return int(getattr(getattr(consumer, "controller", None), "concurrency", 1) or 1)


def _returned(call: Any) -> bool:
    """Whether a pool call has returned: billiard's ApplyResult (prefork), a future (threads), else yes."""
    if hasattr(call, "ready"):
        return bool(call.ready())
    future = getattr(call, "f", None)
    return bool(future.done()) if future is not None and hasattr(future, "done") else True


def split_flush(requests: list[Any], sizes: list[int], share: int) -> list[list[Any]]:
    """``requests`` in order, cut between messages into pieces of at most ``share`` images (a message of
    more is a piece alone)."""
    pieces: list[list[Any]] = []
    images = 0
    for request, n in zip(requests, sizes, strict=True):
        if not pieces or images + n > share:
            pieces.append([])
            images = 0
        pieces[-1].append(request)
        images += n
    return pieces


def _payload_of(request: Any) -> Any:
    args = getattr(request, "args", None)
    return args[0] if isinstance(args, list | tuple) and len(args) == 1 else None


def message_images(message: Any) -> int:
    """The images of one received message (1 when its body cannot say)."""
    payload = message.payload
    args = payload.get("args") if isinstance(payload, dict) else (
        payload[0] if isinstance(payload, list | tuple) and payload else None)
    return image_count(args[0] if isinstance(args, list | tuple) and len(args) == 1 else None)


def check_task_message(message: Any) -> None:
    """Raise InvalidTaskError unless celery-batches can buffer and flush ``message`` as one request:
    a protocol-2 body [args list, kwargs dict, embed] or a protocol-1 dict with 'args' and 'kwargs',
    and no ETA (a far-future one would hold the message unacknowledged forever; producers set none)."""
    from celery.exceptions import InvalidTaskError

    payload = message.payload
    if isinstance(payload, dict) and "args" in payload:
        ok = isinstance(payload["args"], list | tuple) and isinstance(payload.get("kwargs", {}), dict)
        eta = payload.get("eta")
    else:
        ok = (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
              and isinstance(payload[1], dict))
        eta = (message.headers or {}).get("eta")
    if not ok:
        raise InvalidTaskError(f"task body is not [args, kwargs, embed]: {str(payload)[:200]}")
    if eta is not None:
        raise InvalidTaskError(f"task messages with an ETA are not accepted (eta={str(eta)[:40]})")


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(settings, name=f"{_node}:{os.getpid()}" if _node else None)
    return _runtime


# flush_every counts messages, which are chunks of images: out of reach, flush_images decides.
@app.task(base=ReconnectSafeBatches, name=TASK_NAME, flush_every=2**31, flush_images=settings.flush_images,
          flush_interval=settings.flush_interval, acks_late=True, ignore_result=True)
def summarize(requests: list[SimpleRequest]) -> int:
    """Summarize the buffered messages' images (one JSON payload per message) and commit their results."""
    payloads = [r.args[0] if isinstance(r.args, list | tuple) and len(r.args) == 1 else {"bad_args": repr(r.args)[:500]}
                for r in requests]
    rt = runtime()
    if requests and requests[0].hostname:
        rt.rename(f"{requests[0].hostname}:{os.getpid()}")  # the node name Flower shows (set at start too)
    try:
        processed = rt.process(payloads, [_queue_of(r) for r in requests])
    except EngineDeadError as exc:
        # Exit without returning: nothing is acknowledged, leases expire, the reclaimer re-enqueues.
        log.critical("engine dead, exiting process: %s", exc)
        os._exit(70)
    _send_task_events(requests, processed.outcomes)
    return processed.images


def _queue_of(request: SimpleRequest) -> str | None:
    """The queue a message was delivered from (its routing key on Redis), None if unknown."""
    info = request.delivery_info if isinstance(request.delivery_info, dict) else {}
    key = info.get("routing_key")
    return key if isinstance(key, str) and key else None


RETRY_KINDS = ("handed_back", "redelivered")
"""Outcomes whose message goes on to another worker or a later delivery (Flower's RETRY)."""


def _send_task_events(requests: list[SimpleRequest], outcomes: list[Outcome]) -> None:
    """celery-batches sends no per-task events; these let Flower show each task: FAILURE with the
    reason for a failed image or rejected message, REVOKED for a cancelled run, RETRY for a message
    handed back to another model's workers or re-queued after a database or broker outage (never
    SUCCESS: its images did not run here), the task's own share of
    its batches as runtime, and the run id in args, result or exception."""
    if not settings.task_events or not requests:
        return
    try:
        with app.events.default_dispatcher(hostname=requests[0].hostname) as dispatcher:
            for r, out in zip(requests, outcomes, strict=False):
                run = f"run {out.run_id}" if out.run_id is not None else "run ?"
                dispatcher.send("task-received", uuid=r.id, name=r.name, args=f"{run}: {repr(r.args)[:200]}",
                                kwargs="{}", retries=0, eta=None, root_id=r.id, parent_id=None)
                dispatcher.send("task-started", uuid=r.id)
                if out.kind == "cancelled":
                    dispatcher.send("task-revoked", uuid=r.id, terminated=False, signum=None, expired=False)
                elif out.kind in RETRY_KINDS:  # sent on to run elsewhere or later: RETRY, neither success nor failure
                    what = "handed back" if out.kind == "handed_back" else "re-queued"
                    dispatcher.send("task-retried", uuid=r.id, exception=f"{run}: {what}: {out.reason or '-'}",
                                    traceback="")
                elif out.ok:
                    dispatcher.send("task-succeeded", uuid=r.id, runtime=out.seconds,
                                    result=f"{run}: {out.kind}, {out.images} image(s)")
                else:
                    dispatcher.send("task-failed", uuid=r.id, runtime=out.seconds,
                                    exception=f"{run}: {out.kind}: {out.reason}", traceback="")
    except Exception as exc:  # monitoring must never fail a batch whose results are committed
        log.warning("could not send task events: %s", exc)


@signals.worker_process_init.connect
def _start_process(**_: Any) -> None:
    """Pin the GPU (before torch touches CUDA), share the host's CPUs among the pool processes, then load
    the model before taking any batch."""
    global _runtime
    _runtime = None  # never inherit a parent's engine or DB connections across fork
    try:
        _pin_gpu()
        from engine.loader import share_cpus

        log.info("torch uses %d CPU threads in this pool process", share_cpus(_processes, settings.torch_threads))
        runtime().start()
    except UserError as exc:
        # A configuration error (no CUDA for STAGE_A_GPUS, a bad checkpoint): no batch could ever
        # succeed here, so the whole worker stops (warm shutdown) rather than take messages.
        log.critical("cannot serve: %s; stopping this worker", exc)
        _fatal.value = 2
        os.kill(os.getppid(), signal.SIGTERM)
    except Exception as exc:  # the first batch tries again (and fails its rows with the reason)
        log.error("model load at process start failed: %s", first_line(exc))
    finally:
        with _loaded.get_lock():
            _loaded.value += 1


def _pin_gpu() -> None:
    """Process i of this host sees only GPU STAGE_A_GPUS[i]."""
    if not settings.gpus:
        return
    from billiard.process import current_process

    index = getattr(current_process(), "index", 0) or 0
    gpu = settings.gpus[index % len(settings.gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("pool process %d pinned to GPU %s", index, gpu)


@signals.worker_process_shutdown.connect
def _stop_process(pid: int | None = None, **_: Any) -> None:
    if _runtime is not None:
        _runtime.stop()
    metrics.process_dead(pid or os.getpid())  # its live gauges (ready, device memory) stop counting


class WaitForModels(bootsteps.StartStopStep):
    """The consumer fetches no message until every pool process has loaded its model: the step runs
    before the event loop reads the queue, so meanwhile messages stay on the broker for ready workers."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if not type(getattr(c, "pool", None)).__module__.endswith((".prefork", ".solo")):
            return  # thread/green pools send no worker_process_init: their model loads on the first batch
        want = int(getattr(c.controller, "concurrency", 1) or 1)
        deadline = time.monotonic() + settings.model_load_timeout
        if _loaded.value < want:
            log.info("waiting for %d pool process(es) to load the model before taking messages", want)
        while _loaded.value < want and time.monotonic() < deadline:
            time.sleep(0.2)


app.steps["consumer"].add(WaitForModels)
app.steps["consumer"].add(ModelRouter)


@signals.after_setup_logger.connect
def _json_logs(logger: Any = None, **_: Any) -> None:
    """STAGE_A_LOG_FORMAT=json: the worker's log lines as JSON objects too (Celery set up its handlers)."""
    from stage_a.logs import use_json

    if settings.log_format == "json" and logger is not None:
        use_json(*logger.handlers, context=lambda: {"worker": process_name()})


@signals.worker_init.connect
def _check_services(sender: Any = None, **_: Any) -> None:
    """Fail within seconds, one line and exit status 2, when the broker, the database or the pinned
    checkpoint is unusable at start (Celery would retry a mistyped broker URL forever); a supervisor
    restarts the worker, so a late server is still waited for. Also records the node name (-n)."""
    from stage_a.checkpoint import Checkpoint
    from stage_a.queue import TaskQueue

    global _node, _processes
    _node = getattr(sender, "hostname", None)
    _processes = int(getattr(sender, "concurrency", 1) or 1)
    set_node(_node)  # dead letters written in this process carry the same name as the rows
    try:
        TaskQueue(settings).check()
        settings.open_store().close()  # connects and migrates to head
        if settings.checkpoint:
            Checkpoint.open(settings.checkpoint, settings.cache_path / "identity")
        _serve_metrics()
    except UserError as exc:
        refuse_to_start(exc)


def _serve_metrics() -> None:
    """STAGE_A_METRICS_PORT: the exporter of this worker's pool processes, started before the pool forks."""
    try:
        metrics.setup(settings, _node)
    except OSError as exc:
        raise UserError(f"STAGE_A_METRICS_PORT {settings.metrics_port}: cannot serve metrics there "
                        f"({exc.strerror or exc}); each worker on a host needs its own port") from None


@signals.worker_shutdown.connect
def _exit_status(sender: Any = None, **_: Any) -> None:
    """A worker stopped by a pool process's configuration error exits 2 (like the CLI), not 0."""
    if _fatal.value and sender is not None and hasattr(sender, "exitcode"):
        sender.exitcode = _fatal.value


@signals.worker_ready.connect
def _start_reclaimer(sender: Any = None, **_: Any) -> None:
    """Each worker host also runs the recovery loop: a surviving worker rescues a dead one's work."""
    from workers.reclaimer import Reclaimer

    reclaimer = Reclaimer(settings)
    thread = threading.Thread(target=reclaimer.loop, name="stage-a-reclaimer", daemon=True)
    thread.start()


__all__ = ["TASK_NAME", "summarize"]
