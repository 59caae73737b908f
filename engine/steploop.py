"""The one step loop of `stage-a run` and the farm: reuse -> schedule -> prepare (prefetched) -> execute -> record.

The reuse step (engine/reuse.py) comes first: images whose summary the store already holds are
recorded without being planned, read or decoded, and the engine is asked for nothing until an image
must be generated (a lazily built engine is then never loaded). Every generated summary is recorded
with the keys of the bytes it was made from.

Rows that fail are their own errors (engine/policy.py); a batch whose preparation or generation
raises becomes failed rows with the reason and the loop goes on; a dead engine is re-raised. What
differs between callers (where items come from, lease renewal, progress) comes in as hooks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.images import resolve_under_root
from engine.interface import Engine, PreparedBatch, RunContext
from engine.policy import dead_engine_error
from engine.prefetch import Prefetcher
from engine.reuse import ReuseStep, Split, run_scope
from engine.scheduler import plan_batches
from stage_a import reuse
from stage_a.errors import first_line
from stage_a.store import ResultStore, RunInfo
from stage_a.work import ImageResult, WorkItem

log = logging.getLogger(__name__)


def worker_name(suffix: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


@dataclass(frozen=True)
class BatchDone:
    """One recorded model batch, for progress, logs and heartbeats."""

    run_id: int
    results: list[ImageResult]
    seconds: float
    reused: bool = False
    """Results taken by the reuse step (no model ran for them)."""

    @property
    def images(self) -> int:
        return len(self.results)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.results)


@dataclass
class LoopHooks:
    """What a caller adds to the loop. Every hook is optional."""

    before_execute: Callable[[list[WorkItem]], None] | None = None
    """Called with a prepared batch's rows just before generation (the farm renews their leases)."""
    after_batch: Callable[[BatchDone], None] | None = None
    """Called once a batch's results are committed (progress bars, heartbeats)."""
    stop: Callable[[], bool] | None = None
    """Asked before each batch; True ends the loop there (the run was cancelled). Rows of the
    batches not run are left to the caller."""


class StepLoop:
    """One engine, one store. Rendered prompts (contexts) are cached per run."""

    def __init__(self, engine: Engine, store: ResultStore, name: str | None = None,
                 verify_inputs: bool = False, prefetch_depth: int = 2, *, data_dir: str = "",
                 precheck: bool = True) -> None:
        self.engine = engine
        self.store = store
        self.name = name or worker_name()
        self.verify_inputs = verify_inputs
        self.prefetch_depth = prefetch_depth
        self.data_dir = data_dir
        """Mission and prompt data (STAGE_A_DATA_DIR) the reuse scope renders the prompt from, as the engine does."""
        self.reuse = ReuseStep(store, precheck)
        self._contexts: dict[int, RunContext] = {}
        self._scopes: dict[tuple[int, str], str] = {}
        self._batches = 0
        """Batches this loop recorded (the ``batch`` field of its log lines)."""

    def context(self, run: RunInfo) -> RunContext:
        ctx = self._contexts.get(run.id)
        if ctx is None:
            ctx = self.engine.context(run.id, run.spec, verify_inputs=self.verify_inputs or run.spec.verify_inputs)
            self._contexts[run.id] = ctx
        return ctx

    def scope(self, run: RunInfo) -> str:
        """The run's reuse scope with the model this loop's engine serves now (stage_a.reuse)."""
        key = (run.id, self.engine.fingerprint)
        if key not in self._scopes:
            self._scopes[key] = run_scope(run.spec, self.engine.fingerprint, self.data_dir)
        return self._scopes[key]

    def split(self, run: RunInfo, items: Sequence[WorkItem], lookup: bool = True) -> Split:
        """The reuse step over ``items`` (nothing taken when the run does not reuse: see stage_a.reuse.reuses)."""
        if not reuse.reuses(run.spec):
            return Split(self.scope(run), todo=list(items))
        return self.reuse.split(run.spec, self.scope(run), items, lookup=lookup)

    def record_reused(self, run: RunInfo, results: list[ImageResult], hooks: LoopHooks | None = None) -> None:
        """Commit results the reuse step took (in chunks: a progress bar moves on a million-image night)."""
        for i in range(0, len(results), 1000):
            t0 = time.perf_counter()
            chunk = results[i:i + 1000]
            self.store.record_results(chunk, self.name)
            batch = BatchDone(run.id, chunk, time.perf_counter() - t0, reused=True)
            log.info("run %d: %d images reused from earlier results", run.id, len(chunk),
                     extra={"run": run.id, "worker": self.name, "images": len(chunk), "reused": len(chunk)})
            if hooks is not None and hooks.after_batch:
                hooks.after_batch(batch)

    def plan(self, run: RunInfo, items: Iterable[WorkItem]) -> Iterable[list[WorkItem]]:
        """Schedule: model batches of ``items`` (never touches the model)."""
        ctx = self.context(run)
        return plan_batches(items, run.spec.sharding_mode, run.spec.batch_size,
                            cost=lambda it: self.engine.estimate_cost(ctx, it))

    def run(self, run: RunInfo, items: Sequence[WorkItem] | None = None, *,
            batches: Iterable[list[WorkItem]] | None = None, hooks: LoopHooks | None = None,
            split: Split | None = None) -> int:
        """Process ``items`` (or pre-planned ``batches`` of an earlier ``split``'s todo) of one run to the
        store; returns rows recorded."""
        hooks = hooks or LoopHooks()
        done = 0
        if batches is None:
            split = self.split(run, items or [])
            self.record_reused(run, split.reused, hooks)
            done += len(split.reused)
            if not split.todo:
                return done
        split = split or Split(self.scope(run))
        ctx = self.context(run)
        planned = batches if batches is not None else self.plan(run, split.todo)
        with Prefetcher(lambda b: self.engine.prepare(ctx, b), planned, self.prefetch_depth) as pf:
            for rows, prepared, error in pf:
                if hooks.stop is not None and hooks.stop():
                    log.warning("run %d: stopping before the next batch (run cancelled)", run.id)
                    break
                t0 = time.perf_counter()
                if prepared is None:
                    results = self._failed(rows, "preparing the batch", error)
                else:
                    if hooks.before_execute:
                        hooks.before_execute(prepared.items)
                    results = self._execute(prepared)
                    self._keys(run, prepared, results)
                results += [c for r in list(results) for c in split.copies_of(r, run.id)]
                self.store.record_results(results, self.name, model=self.engine.fingerprint,
                                          engine=self.engine.name)
                batch = BatchDone(run.id, results, time.perf_counter() - t0)
                self._batches += 1
                _log_batch(batch, self.name, self._batches)
                done += len(results)
                if hooks.after_batch:
                    hooks.after_batch(batch)
        return done

    def _keys(self, run: RunInfo, batch: PreparedBatch, results: list[ImageResult]) -> None:
        """Key each generated summary by the bytes it was made from (and the file's signature then)."""
        scope = self.scope(run)
        rel_paths = {it.key: it.rel_path for it in batch.items}
        for r in results:
            facts = batch.files.get(r.key)
            if not r.ok or facts is None:
                continue
            r.reuse_key = reuse.content_key(scope, facts.digest)
            if facts.signature is not None and r.key in rel_paths:
                path = resolve_under_root(rel_paths[r.key], run.spec.input_root)
                r.stat_key = reuse.stat_key(scope, str(path), facts.signature)

    def _execute(self, batch: PreparedBatch) -> list[ImageResult]:
        try:
            results = self.engine.generate(batch)
            _check_every_row_once(batch, results)
            return results
        except Exception as exc:
            return self._failed([*batch.items], "generation", exc, already=batch.failed)

    def _failed(self, rows: list[WorkItem], stage: str, exc: BaseException | None,
                already: list[ImageResult] | None = None) -> list[ImageResult]:
        """The batch's rows as failures with the reason; a dead engine is re-raised instead."""
        if exc is not None:
            dead = dead_engine_error(exc)
            if dead is not None:
                raise dead from exc
        reason = f"{stage} failed: {first_line(exc, typed=True)}"
        log.error("%s for a batch of %d images: %s", stage, len(rows), first_line(exc, typed=True),
                  exc_info=log.isEnabledFor(logging.DEBUG))
        done = {r.key for r in already or []}
        return list(already or []) + [ImageResult(key=it.key, error=reason) for it in rows if it.key not in done]


def _log_batch(batch: BatchDone, worker: str, number: int) -> None:
    rate = batch.images / batch.seconds if batch.seconds > 0 else 0.0
    tokens = batch.completion_tokens / batch.seconds if batch.seconds > 0 else 0.0
    # The fields again as ``extra``: STAGE_A_LOG_FORMAT=json puts them in each line's object.
    log.info("run %d: batch of %d images (%d failed) in %.2fs, %.2f images/s, %.1f tokens/s",
             batch.run_id, batch.images, batch.failed, batch.seconds, rate, tokens,
             extra={"run": batch.run_id, "worker": worker, "batch": number, "images": batch.images,
                    "failed": batch.failed, "seconds": round(batch.seconds, 3), "tokens": batch.completion_tokens})


def _check_every_row_once(batch: PreparedBatch, results: list[ImageResult]) -> None:
    """Each row comes back exactly once (the Ray Data invariant): a lost row would be a lost image."""
    expected = sorted([it.key for it in batch.items] + [r.key for r in batch.failed])
    got = sorted(r.key for r in results)
    if expected != got:
        raise RuntimeError(f"engine returned {len(got)} results for {len(expected)} rows")
