"""The batch runner shared by `stage-a run` and the Celery worker: schedule, execute, record."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from stage_a.store import ResultStore, RunInfo
from stage_a.work import ImageResult, WorkItem
from workers.engine import BatchEngine, PreparedBatch, RunContext
from workers.prefetch import Prefetcher
from workers.scheduler import plan_batches

log = logging.getLogger(__name__)


def worker_name(suffix: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


@dataclass
class BatchStats:
    rows: int
    ok: int
    failed: int
    pad_fraction: float


class BatchRunner:
    """One engine, one store. Contexts (rendered prompts) are cached per run."""

    def __init__(self, engine: BatchEngine, store: ResultStore, name: str | None = None,
                 verify_inputs: bool = False) -> None:
        self.engine = engine
        self.store = store
        self.name = name or worker_name()
        self.verify_inputs = verify_inputs
        self._contexts: dict[int, RunContext] = {}

    def context(self, run: RunInfo) -> RunContext:
        ctx = self._contexts.get(run.id)
        if ctx is None:
            ctx = self.engine.context(run.id, run.spec, verify_inputs=self.verify_inputs)
            self._contexts[run.id] = ctx
        return ctx

    def batches(self, run: RunInfo, items: Iterable[WorkItem]) -> Iterable[list[WorkItem]]:
        ctx = self.context(run)
        return plan_batches(
            items, run.spec.sharding_mode, run.spec.batch_size,
            cost=lambda it: self.engine.estimate_cost(ctx, it),
        )

    def execute(self, batch: PreparedBatch) -> list[ImageResult]:
        """Generate one prepared batch and commit its results before returning."""
        results = self.engine.generate(batch)
        _check_every_row_once(batch, results)
        self.store.record_results(results, self.name)
        return results

    def run_items(
        self,
        run: RunInfo,
        items: Sequence[WorkItem],
        on_batch: Callable[[list[ImageResult]], None] | None = None,
        prefetch_depth: int = 2,
    ) -> int:
        """Process ``items`` of one run to the store; returns how many were processed."""
        ctx = self.context(run)
        done = 0
        with Prefetcher(lambda b: self.engine.prepare(ctx, b), self.batches(run, items), prefetch_depth) as pf:
            for prepared in pf:
                results = self.execute(prepared)
                done += len(results)
                if on_batch:
                    on_batch(results)
        return done


def _check_every_row_once(batch: PreparedBatch, results: list[ImageResult]) -> None:
    """Each row comes back exactly once (the Ray Data invariant): a lost row would be a lost image."""
    expected = sorted([it.key for it in batch.items] + [r.key for r in batch.failed])
    got = sorted(r.key for r in results)
    if expected != got:
        raise RuntimeError(f"engine returned {len(got)} results for {len(expected)} rows")
