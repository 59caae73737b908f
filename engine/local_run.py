"""Running a recorded run on this host without a broker: one engine, or one pinned process per GPU."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from engine.interface import Engine, PreparedBatch, RunContext
from engine.steploop import BatchDone
from stage_a.checkpoint import Checkpoint
from stage_a.config import RunSpec
from stage_a.settings import Settings
from stage_a.store import ResultStore
from stage_a.work import ImageResult, WorkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalJob:
    db_url: str
    run_id: int
    checkpoint: str
    settings: Settings
    device: str = "auto"
    verify_inputs: bool = False
    engine: str = "transformers"


class LazyEngine:
    """The engine of a local run, loaded on first use: a night whose every image is reused loads no model.

    Its identity is the checkpoint's (what the engine's fingerprint will be), known without loading."""

    def __init__(self, checkpoint: Checkpoint, load: Callable[[], Engine], kind: str) -> None:
        self.fingerprint = checkpoint.identity
        self.name = kind
        self._load = load
        self._engine: Engine | None = None

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def _get(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
        return self._engine

    def use_adapter(self, adapter: Checkpoint | None) -> None:
        self._get().use_adapter(adapter)

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext:
        return self._get().context(run_id, spec, verify_inputs)

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int:
        return self._get().estimate_cost(ctx, item)

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch[Any]:
        return self._get().prepare(ctx, items)

    def generate(self, batch: PreparedBatch[Any]) -> list[ImageResult]:
        return self._get().generate(batch)


def _loop(job: LocalJob, store: ResultStore, name: str, on_loading: Callable[[], None] | None = None) -> Any:
    from engine.hosting import build_engine
    from engine.steploop import StepLoop

    checkpoint = Checkpoint.open(job.checkpoint, job.settings.cache_path / "identity")

    def load() -> Engine:
        if on_loading:
            on_loading()
        return build_engine(checkpoint, job.device, job.settings, job.engine)

    return StepLoop(LazyEngine(checkpoint, load, job.engine), store, name, verify_inputs=job.verify_inputs,
                    data_dir=job.settings.data_dir, precheck=job.settings.reuse_precheck)


def run_in_process(job: LocalJob, on_batch: Callable[[BatchDone], None] | None = None,
                   rank: int = 0, world: int = 1, store: ResultStore | None = None,
                   on_loading: Callable[[], None] | None = None) -> int:
    """Process this rank's share of the run's unfinished images, loading the model once one must be generated."""
    from engine.steploop import LoopHooks, worker_name

    own_store = store is None
    store = store or job.settings.open_store(job.db_url)
    try:
        run = store.get_run(job.run_id)
        items = store.unfinished_items(run.id)
        if not items:
            return 0
        loop = _loop(job, store, worker_name(f"/rank{rank}" if world > 1 else ""), on_loading)
        # `stage-a cancel` works here too: the loop stops before its next batch.
        hooks = LoopHooks(after_batch=on_batch, stop=lambda: store.is_cancelled(run.id))
        if world == 1:
            return int(loop.run(run, items, hooks=hooks))
        # The parent took what the store had (reuse_first); every rank holds back the same duplicates and
        # makes the same deterministic plan, each taking every world-th batch (torchrun-style).
        split = loop.split(run, items, lookup=False)
        batches = [b for i, b in enumerate(loop.plan(run, split.todo)) if i % world == rank]
        return int(loop.run(run, batches=batches, hooks=hooks, split=split))
    finally:
        if own_store:
            store.close()


def reuse_first(job: LocalJob) -> int:
    """Before ranks start (and load models): record every unfinished image whose summary the store already
    holds; returns how many are left to generate."""
    from engine.steploop import worker_name

    store = job.settings.open_store(job.db_url)
    try:
        run = store.get_run(job.run_id)
        items = store.unfinished_items(run.id)
        if not items:
            return 0
        loop = _loop(job, store, worker_name())
        split = loop.split(run, items)
        loop.record_reused(run, split.reused)
        return len(items) - len(split.reused)
    finally:
        store.close()


def _die_with_parent(parent: int) -> None:
    """A rank must not outlive `stage-a run`: killed by SIGKILL (the OOM killer, `kill -9`), the
    parent cannot stop its ranks, and an orphan would keep its GPU and write on beside the resume."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _rank_main(job: LocalJob, gpu: str, rank: int, world: int, parent: int) -> None:
    from engine.loader import pin_process_to_gpu, share_cpus

    _die_with_parent(parent)
    pin_process_to_gpu(gpu)
    share_cpus(world, job.settings.torch_threads)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    device = "cpu" if gpu == "cpu" else job.device  # a pinned GPU is this process's cuda:0
    run_in_process(replace(job, device=device, verify_inputs=job.verify_inputs and rank == 0),
                   rank=rank, world=world)


def run_multi(job: LocalJob, gpus: list[str], poll: Callable[[], None] | None = None) -> None:
    """One spawned process per GPU (each sees only its GPU); the parent takes reusable summaries first,
    then only watches progress."""
    if reuse_first(job) == 0:
        if poll:
            poll()
        return
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn also keeps each rank's engine private
    procs = [ctx.Process(target=_rank_main, args=(job, gpu, r, len(gpus), os.getpid()), name=f"stage-a-rank{r}")
             for r, gpu in enumerate(gpus)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if poll:
                poll()
            time.sleep(0.5)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    if poll:
        poll()
    bad = [f"rank {r} (exit {p.exitcode})" for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError("engine processes failed: " + ", ".join(bad))
