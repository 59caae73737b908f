"""Which model queues an unpinned worker consumes.

A run's messages wait on the queue of its base model (stage_a.queue.model_queue). A pinned worker
consumes its model's queue from the start (workers/celery.py). An unpinned one consumes one model's
queue at a time, chosen here: the model it has while that model has messages waiting, another only
when it has none (a switch is a reload of many GB), and never a model whose checkpoint at the run's
path on this host is not the one the run was registered with (that is recorded as the worker's
problem, for status). The choice is made in a thread (opening a checkpoint may hash it); the
consumer's event loop only applies it (ModelRouter).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from stage_a.checkpoint import DEMO_MODEL, Checkpoint
from stage_a.errors import UserError, first_line
from stage_a.queue import TaskQueue, model_queue
from stage_a.settings import Settings
from stage_a.store import ResultStore, utcnow
from stage_a.store.queries import RouteWork

log = logging.getLogger(__name__)

CHOOSE_INTERVAL_S = 2.0
"""Seconds between two looks at the queues (a switch waits at most this long after a model's queue empties)."""


class RouteChooser:
    """The routing decision, without Celery: tests drive it against a real store and broker."""

    def __init__(self, settings: Settings, store: ResultStore, queue: TaskQueue,
                 report: Callable[[str | None], None] = lambda problem: None, node: str = "") -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.node = node
        """This worker's node name: its own heartbeat rows are not counted as other holders."""
        self.report = report
        """Called with this host's problem after each look (None: it can serve every model with work)."""

    def refusal(self, work: RouteWork) -> str | None:
        """Why this host cannot serve ``work``'s run (None: it can): the checkpoint at the run's path here must
        be the run's model itself (an adapter too, not only its base)."""
        if work.route == DEMO_MODEL:
            return None
        try:
            here = Checkpoint.open(work.checkpoint, self.settings.cache_path / "identity")
        except UserError as exc:
            return f"run {work.run_id} needs model {work.model}: {exc}"
        if here.identity != work.model:
            return f"run {work.run_id} needs model {work.model}, but {here.path} on this host is {here.identity}"
        return None

    def choose(self, current: str | None) -> str | None:
        """The route to consume next, given the one consumed now (None: none). A route is servable when some
        of its runs is (their checkpoints differ: an adapter may be missing here while the base is not)."""
        servable: list[str] = []
        problems = []
        for work in self.store.queries.routes_with_work():
            reason = self.refusal(work)
            if reason is None:
                if work.route not in servable:
                    servable.append(work.route)
            else:
                problems.append(reason)
        self.report("; ".join(problems) or None)
        lengths = dict(zip(servable, self.queue.lengths([self.queue.queue_for(r) for r in servable]), strict=True))
        if current is not None and lengths.get(current, 0) > 0:
            return current
        waiting = [r for r in servable if lengths[r] > 0]
        if not waiting:
            return current if current in lengths else None
        # Messages per worker already holding the model: a second unpinned worker takes the model nobody
        # serves yet rather than join the first on the longest queue.
        holders = self._holders()
        return max(waiting, key=lambda r: lengths[r] / (1 + holders.get(r, 0)))

    def _holders(self) -> dict[str, int]:
        """Online workers (of other nodes) by the model they hold."""
        out: dict[str, int] = {}
        for w in self.store.queries.worker_beats(utcnow(), self.settings.heartbeat_timeout):
            if w.online and w.model and not (self.node and w.name.startswith(f"{self.node}:")):
                out[w.model] = out.get(w.model, 0) + 1
        return out


class ModelRouter(bootsteps.StartStopStep):
    """Consumer step of an unpinned worker: applies RouteChooser's choice with Celery's own
    add_task_queue / cancel_task_queue (what the add_consumer / cancel_consumer control commands do)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.current: str | None = None
        self.wanted: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._tref: Any = None

    def start(self, c: Any) -> None:
        from workers.celery import settings

        if settings.checkpoint:
            return  # pinned: its queues are fixed (workers/celery.py)
        if self._thread is None:
            node = str(getattr(c, "hostname", "") or "")
            self._thread = threading.Thread(target=self._decide, args=(settings, node), name="stage-a-router",
                                            daemon=True)
            self._thread.start()
        if self._tref is not None:
            self._tref.cancel()
        self._tref = c.timer.call_repeatedly(0.5, self.apply, (c,))  # re-armed at every (re)connect

    def apply(self, c: Any) -> None:
        want = self.wanted
        if want == self.current:
            return
        from workers.celery import settings

        if self.current is not None:
            c.cancel_task_queue(model_queue(settings.queue, self.current))
        if want is not None:
            name = model_queue(settings.queue, want)
            c.add_task_queue(name, exchange=name, exchange_type="direct", routing_key=name)
        log.info("consuming model %s (was %s)", want or "none", self.current or "none")
        self.current = want

    def _decide(self, settings: Settings, node: str) -> None:
        store = settings.open_store(migrate=False)
        last_problem: list[str | None] = [None]

        def report(problem: str | None) -> None:
            # Logged when it changes; a standing problem is written at every look, since a pool process
            # that (re)starts after the first write clears its row's problem with its first heartbeat.
            if problem != last_problem[0] and problem:
                log.error("cannot serve: %s", problem)
            if node and (problem or problem != last_problem[0]):
                store.worker_problem(node, problem)
            last_problem[0] = problem

        chooser = RouteChooser(settings, store, TaskQueue(settings), report, node)
        while not self._stop.is_set():
            try:
                self.wanted = chooser.choose(self.current)
            except Exception as exc:  # the database or broker may be restarting; look again soon
                log.warning("model routing check failed: %s", first_line(exc))
            self._stop.wait(CHOOSE_INTERVAL_S)

    def shutdown(self, c: Any) -> None:
        self._stop.set()
