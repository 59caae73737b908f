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

from engine.steploop import BatchDone
from stage_a.checkpoint import Checkpoint
from stage_a.settings import Settings
from stage_a.store import ResultStore

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


def run_in_process(job: LocalJob, on_batch: Callable[[BatchDone], None] | None = None,
                   rank: int = 0, world: int = 1, store: ResultStore | None = None,
                   on_loading: Callable[[], None] | None = None) -> int:
    """Load the model and process this rank's share of the run's unfinished images."""
    from engine.hosting import build_engine
    from engine.steploop import LoopHooks, StepLoop, worker_name

    own_store = store is None
    store = store or job.settings.open_store(job.db_url)
    try:
        run = store.get_run(job.run_id)
        items = store.unfinished_items(run.id)
        if not items:
            return 0
        if on_loading:
            on_loading()
        engine = build_engine(Checkpoint.open(job.checkpoint, job.settings.cache_path / "identity"), job.device, job.settings, job.engine)
        loop = StepLoop(engine, store, worker_name(f"/rank{rank}" if world > 1 else ""),
                        verify_inputs=job.verify_inputs)
        # Same deterministic plan in every rank, each takes every world-th batch (torchrun-style).
        batches = [b for i, b in enumerate(loop.plan(run, items)) if i % world == rank]
        # `stage-a cancel` works here too: the loop stops before its next batch.
        hooks = LoopHooks(after_batch=on_batch, stop=lambda: store.is_cancelled(run.id))
        return loop.run(run, batches=batches, hooks=hooks)
    finally:
        if own_store:
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
    from engine.loader import pin_process_to_gpu

    _die_with_parent(parent)
    pin_process_to_gpu(gpu)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    device = "cpu" if gpu == "cpu" else job.device  # a pinned GPU is this process's cuda:0
    run_in_process(replace(job, device=device, verify_inputs=job.verify_inputs and rank == 0),
                   rank=rank, world=world)


def run_multi(job: LocalJob, gpus: list[str], poll: Callable[[], None] | None = None) -> None:
    """One spawned process per GPU (each sees only its GPU); the parent only watches progress."""
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
