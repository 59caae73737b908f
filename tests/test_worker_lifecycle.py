"""Worker lifecycle and cancellation on a real farm (own Redis, real PostgreSQL, Celery worker processes).

- the model is loaded at process start, before the worker says ready, and the log says so;
- `enqueue --verify-inputs` reaches the workers (the verify_inputs lines of their first batch);
- heartbeats: model/engine at start, the last batch after one, refreshed while idle, stopped at shutdown;
- one INFO line per batch in the worker log, no Alembic INFO chatter;
- `stage-a cancel` mid-run: nothing more of that run is processed (at most the batch already running),
  its queued messages are dropped, another run is unaffected, the reclaimer leaves it alone, export
  says cancelled, and a second cancel is harmless.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from support.counts import assert_counters_exact
from support.farm import FAILURES, Farm, Worker, cli, farm_factory, make_tree, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

FLUSH = "4"


def test_model_loaded_at_start_heartbeats_and_batch_logs(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    from stage_a.checkpoint import Checkpoint

    farm: Farm = farm_factory(pg_url, STAGE_A_HEARTBEAT_INTERVAL="1", STAGE_A_FLUSH_SIZE=FLUSH)
    worker = farm.worker("life")
    wait_for(worker.ready, 120, "worker ready", on_timeout=farm.logs)
    log = worker.log()
    loaded = re.search(r"model \S+ \(\S+\) loaded on cpu by the transformers engine in [\d.]+ s", log)
    assert loaded, log[-3000:]
    assert loaded.start() < log.index(" ready."), "the model must be loaded before the worker takes messages"

    store = farm.store()
    try:
        beats = {b.name: b for b in store.queries.worker_beats()}
        assert len(beats) == 1, beats
        beat = next(iter(beats.values()))
        assert beat.name.startswith("life@") and beat.state == "ready", beat
        assert beat.model == Checkpoint.open(farm.checkpoint).identity and beat.engine == "transformers"
        assert beat.device == "cpu" and beat.last_batch_at is None and beat.images_total == 0
        # Idle heartbeats keep coming.
        first = beat.heartbeat_at
        wait_for(lambda: store.queries.worker_beats()[0].heartbeat_at > first, 10, "an idle heartbeat")

        make_tree(tmp_path / "in", groups=3, per_group=2)
        run_id = farm.enqueue(tmp_path / "in", "--verify-inputs")  # recorded with the run, honoured by workers
        assert store.get_run(run_id).spec.verify_inputs
        farm.wait_finished(run_id, 150)
        beat = wait_for(lambda: next((b for b in store.queries.worker_beats() if b.images_total == 6), None), 10,
                        "heartbeat with the run's 6 images", on_timeout=lambda: f"{store.queries.worker_beats()}")
        assert beat.run_id == run_id and beat.last_batch_at is not None
        assert beat.last_batch_images and beat.last_batch_seconds and beat.images_per_s
        assert beat.tokens_per_s is not None
    finally:
        store.close()

    log = worker.log()
    batch_lines = [ln for ln in log.splitlines() if re.search(rf"INFO.*run {run_id}: batch of \d+ images", ln)]
    assert batch_lines, log[-3000:]
    assert sum(int(re.search(r"batch of (\d+)", ln).group(1)) for ln in batch_lines) == 6  # type: ignore[union-attr]
    assert "images/s" in batch_lines[0] and "tokens/s" in batch_lines[0]
    assert re.search(r"verify_inputs \S+\.jpg: file_sha256=[0-9a-f]{64} pixel_sha256=", log), log[-3000:]
    assert "Context impl" not in log and "Will assume transactional DDL" not in log, log[-3000:]
    assert not [ln for ln in log.splitlines() if "alembic" in ln.lower() and "INFO" in ln]

    # Warm shutdown: the heartbeat row says stopped.
    assert worker.proc is not None
    os.kill(worker.proc.pid, signal.SIGTERM)
    worker.proc.wait(60)
    store = farm.store()
    try:
        assert [b.state for b in store.queries.worker_beats()] == ["stopped"], store.queries.worker_beats()
    finally:
        store.close()


def test_cancel_mid_run(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    # Short reclaim/orphan timings: a reclaimer that re-enqueued the cancelled run's pending images
    # would show within seconds.
    farm: Farm = farm_factory(pg_url, STAGE_A_FLUSH_SIZE=FLUSH, STAGE_A_HEARTBEAT_INTERVAL="1")
    worker = farm.worker("cancel")
    make_tree(tmp_path / "big", groups=30, per_group=2, seed=1)
    make_tree(tmp_path / "small", groups=3, per_group=2, seed=2)
    wait_for(worker.ready, 120, "worker ready", on_timeout=farm.logs)
    # Long enough (32 new tokens per image) that the run is still going when the cancel lands.
    big = farm.enqueue(tmp_path / "big", "--max-new-tokens", "32")
    small = farm.enqueue(tmp_path / "small")  # queued behind all of the big run's messages

    store = farm.store()
    try:
        wait_for(lambda: store.queries.counts(big).done >= 4, 120, "the big run to start", on_timeout=farm.logs)
        proc = cli(["cancel", str(big)], farm.env(), tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"run {big}: cancelled at" in proc.stdout, proc.stdout
        assert re.search(rf"run {big}: \d+ queued images removed", proc.stdout), proc.stdout
        at_cancel = store.queries.counts(big)

        # The other run is unaffected and finishes; nothing more of the cancelled run is processed
        # beyond the one model batch (--batch-size FLUSH) that may have been running.
        counts = farm.wait_finished(small, 150)
        assert (counts.done, counts.failed) == (6, 0)
        time.sleep(8)  # several reclaim rounds (STAGE_A_RECLAIM_INTERVAL=1, orphan grace 4 s)
        after = store.queries.counts(big)
        assert after.done + after.failed <= at_cancel.done + at_cancel.failed + int(FLUSH), (at_cancel, after)
        assert after.done + after.failed < 60
        assert after.leased == 0, after  # images of a stopped buffer went back to pending, not left leased
        assert farm.redis.queued(farm.queue) == 0 and farm.redis.unacked() == 0
        assert store.queries.counts(big) == after  # still nothing moves: the reclaimer leaves the run alone
        assert store.get_run(big).cancelled and not store.get_run(small).cancelled
        assert_counters_exact(store.engine, [big, small])  # the cancel and its unleases kept them exact
    finally:
        store.close()

    again = cli(["cancel", str(big)], farm.env(), tmp_path)
    assert again.returncode == 0 and f"run {big}: already cancelled at" in again.stdout, again.stdout + again.stderr

    out = tmp_path / "out"
    exp = farm.export(big, out)
    assert exp.returncode == 3, exp.stderr
    assert f"run {big} was cancelled at" in exp.stderr and "(cancelled)" in exp.stdout, exp.stdout + exp.stderr
    assert "not processed: run cancelled" in (out / FAILURES).read_text(encoding="utf-8")
    assert farm.export(small, tmp_path / "out_small").returncode == 0


def test_unpinned_worker_with_a_gpu_on_a_host_without_cuda_stops(pg_url: str, farm_factory,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """No STAGE_A_CHECKPOINT (each run's model is loaded on its first batch): the device is still
    checked at start, so the worker never takes a message it can only fail."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    farm: Farm = farm_factory(pg_url)
    make_tree(tmp_path / "in", groups=1, per_group=2)
    run_id = farm.enqueue(tmp_path / "in")
    env = farm.env(STAGE_A_GPUS="0")
    env["STAGE_A_CHECKPOINT"] = ""  # empty is unset: an unpinned worker
    worker = Worker("nocuda-unpinned", env, farm.workdir).start()
    farm.workers.append(worker)
    assert worker.proc is not None
    assert worker.proc.wait(120) == 2, worker.log()
    log = worker.log()
    assert "cannot serve: device 'cuda:0' requested but no CUDA GPU is visible; stopping this worker" in log, log
    assert "Traceback" not in log, log
    assert farm.redis.queued_images(farm.queue) == 2  # its messages are still there for a worker that can serve
    store = farm.store()
    try:
        assert store.queries.counts(run_id).pending == 2
    finally:
        store.close()


def test_worker_pinned_to_a_gpu_on_a_host_without_cuda_stops(pg_url: str, farm_factory) -> None:  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    farm: Farm = farm_factory(pg_url)
    worker = farm.worker("nocuda", STAGE_A_GPUS="0")
    assert worker.proc is not None
    assert worker.proc.wait(120) == 2  # it stops by itself, on an error: no message is ever taken
    log = worker.log()
    assert "cannot serve: device 'cuda:0' requested but no CUDA GPU is visible; stopping this worker" in log, log
    assert "batch of" not in log
    store = farm.store()
    try:
        assert [(b.state, b.device) for b in store.queries.worker_beats()] == [("stopped", "cuda:0")]
    finally:
        store.close()
