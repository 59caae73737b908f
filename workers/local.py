"""Running a recorded run on this host without a broker: one engine, or one pinned process per GPU."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass

from stage_a.store import ResultStore
from stage_a.work import ImageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalJob:
    db_url: str
    run_id: int
    checkpoint: str
    device: str = "auto"
    verify_inputs: bool = False
    engine: str = "transformers"


def run_in_process(job: LocalJob, on_batch: Callable[[list[ImageResult]], None] | None = None,
                   rank: int = 0, world: int = 1, store: ResultStore | None = None) -> int:
    """Load the model and process this rank's share of the run's unfinished images."""
    from workers.engines import load_engine
    from workers.runner import BatchRunner, worker_name

    own_store = store is None
    store = store or ResultStore(job.db_url)
    try:
        run = store.get_run(job.run_id)
        items = store.unfinished_items(run.id)
        if not items:
            return 0
        engine = load_engine(job.engine, job.checkpoint, job.device)
        runner = BatchRunner(engine, store, worker_name(f"/rank{rank}" if world > 1 else ""),
                             verify_inputs=job.verify_inputs)
        if world > 1:
            # Same deterministic plan in every rank, each takes every world-th batch (torchrun-style).
            batches = [b for i, b in enumerate(runner.batches(run, items)) if i % world == rank]
            items = [it for b in batches for it in b]
        return runner.run_items(run, items, on_batch=on_batch)
    finally:
        if own_store:
            store.close()


def _rank_main(job: LocalJob, gpu: str, rank: int, world: int) -> None:
    from workers.loader import pin_process_to_gpu

    pin_process_to_gpu(gpu)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    device = "cpu" if gpu == "cpu" else job.device  # a pinned GPU is this process's cuda:0
    run_in_process(LocalJob(job.db_url, job.run_id, job.checkpoint, device, job.verify_inputs and rank == 0,
                            job.engine), rank=rank, world=world)


def run_multi(job: LocalJob, gpus: list[str], poll: Callable[[], None] | None = None) -> None:
    """One spawned process per GPU (each sees only its GPU); the parent only watches progress."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn also keeps each rank's engine private
    procs = [ctx.Process(target=_rank_main, args=(job, gpu, r, len(gpus)), name=f"stage-a-rank{r}")
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
