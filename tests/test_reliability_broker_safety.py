"""Broker safety: an evicting Redis is refused, a full one is a one-line error with the run resumable,
and the reclaimer re-sends in bounded chunks and backs off while the broker fails.

Each test runs its own redis-server (support.farm.RedisServer) and sets maxmemory and the policy
with CONFIG SET, as an operator's redis.conf would.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import MISSION, Farm, RedisServer, farm_factory, make_tree, wait_for  # noqa: F401
from support.queues import queued_images
from test_cli_errors import assert_one_line_error

from stage_a.config import RunSpec
from stage_a.settings import Settings
from stage_a.store import GroupInput, ResultStore, utcnow
from workers.reclaimer import Reclaimer

QUEUE = "stage_a_broker_safety"


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="s3cret-pw")
    server.start()
    yield server
    server.kill()


def _farm_run(pg_url: str, n_images: int) -> int:
    store = ResultStore(pg_url)
    groups = [GroupInput(f"QC-BS-20240101-{g:07d}", "pass", (f"x/{g}/a.jpg", f"x/{g}/b.jpg"))
              for g in range(n_images // 2)]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups, farm=True)
    store.close()
    return run_id


def _enqueue(input_dir: Path, checkpoint: Path, env: dict[str, str], cwd: Path, *extra: str):  # type: ignore[no-untyped-def]
    return cli(["enqueue", "--mission", MISSION, "--input-dir", str(input_dir), "--checkpoint", str(checkpoint),
                "--sharding-mode", "per_image", *extra], env, cwd, timeout=180)


@pytest.mark.slow
def test_evicting_redis_is_refused_by_enqueue_and_workers_and_status_warns(pg_url: str, farm_factory,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1, per_group=2)
    farm: Farm = farm_factory(pg_url, redis_password="s3cret-pw")
    farm.redis.client().config_set("maxmemory", "64mb")
    farm.redis.client().config_set("maxmemory-policy", "allkeys-lru")

    refused = _enqueue(tmp_path / "in", farm.checkpoint, farm.env(), tmp_path)
    line = assert_one_line_error(refused, "maxmemory-policy allkeys-lru", "noeviction")
    assert "s3cret" not in line
    store = ResultStore(pg_url)
    assert store.queries.run_ids() == []  # refused before anything was recorded
    store.close()

    worker = farm.worker("evict")
    wait_for(lambda: not worker.alive(), 90, "the worker to refuse the broker", on_timeout=farm.logs)
    assert worker.proc is not None and worker.proc.returncode == 2
    assert "maxmemory-policy allkeys-lru" in worker.log() and "noeviction" in worker.log()

    run_id = _farm_run(pg_url, 2)
    status = cli(["status", str(run_id)], farm.env(), tmp_path, timeout=120)  # a view warns, never refuses
    assert status.returncode == 0, status.stderr
    assert "maxmemory-policy is allkeys-lru" in status.stdout and "noeviction" in status.stdout, status.stdout


@pytest.mark.slow
def test_full_broker_enqueue_is_one_line_and_the_run_resumes(pg_url: str, redis: RedisServer, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1500, per_group=2)
    client = redis.client()
    used = int(client.info("memory")["used_memory"])
    # No room: the run's first LPUSH (its ~100 chunk messages of 3,000 images, one command) is refused.
    client.config_set("maxmemory", str(used - 100_000))
    client.config_set("maxmemory-policy", "noeviction")
    env = base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=redis.url, STAGE_A_QUEUE=QUEUE)

    full = _enqueue(tmp_path / "in", tiny_checkpoint, env, tmp_path)
    line = assert_one_line_error(full, "broker is full", "OOM")
    assert "s3cret" not in line
    store = ResultStore(pg_url)
    try:
        [run_id] = store.queries.run_ids()
        queued = redis.queued(QUEUE)
        assert queued == 0
        assert f"run {run_id}: 0 image tasks queued" in line, line
        assert f"stage-a enqueue --run {run_id}" in line, line
        assert len(store.unfinished_items(run_id)) == 3000  # nothing lost: every image still to do

        client.config_set("maxmemory", "0")  # the operator makes room
        resumed = cli(["enqueue", "--run", str(run_id)], env, tmp_path, timeout=180)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "3000 image tasks queued" in resumed.stdout, resumed.stdout
        assert 0 < redis.queued(QUEUE) < 3000 / 16  # chunks of images, not a message each
    finally:
        store.close()


def test_reclaimer_resends_in_bounded_chunks_and_stops_at_a_full_broker(pg_url: str, redis: RedisServer) -> None:
    """2,500 images whose messages were lost: against a full broker a pass sends one chunk of at most
    1,000 (refused: nothing is recorded as re-sent) and stops; with room, they go 1,000 at a time."""
    from stage_a.errors import UserError

    _farm_run(pg_url, 2500)
    settings = Settings(broker_url=redis.url, database_url=pg_url, queue=QUEUE)
    later = utcnow() + timedelta(seconds=settings.orphan_grace_seconds + 60)
    store = ResultStore(pg_url)
    client = redis.client()
    try:
        reclaimer = Reclaimer(settings, store, clock=lambda: later)
        sends: list[int] = []
        real_send = reclaimer._send

        def counted(items):  # type: ignore[no-untyped-def]
            sends.append(len(items))
            real_send(items)

        reclaimer._send = counted  # type: ignore[method-assign]
        reclaimer.queue.length()  # connected (kombu's bindings written) before the broker fills
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) - 100_000))
        with pytest.raises(UserError, match="OOM"):
            reclaimer.once()
        assert sends == [1000] and redis.queued(QUEUE) == 0
        assert len(store.orphaned_pending(settings.orphan_grace_seconds, now=later)) == 2500  # none claimed

        client.config_set("maxmemory", "0")
        client.delete(QUEUE)  # what the refused chunk pushed is gone again: the broker is idle
        sends.clear()
        assert reclaimer.once().orphaned == 2500
        assert sends == [1000, 1000, 500] and queued_images(client, QUEUE) == 2500
        assert redis.queued(QUEUE) < 2500 / 8  # in chunks (each send of 1,000 ends in small ones)
    finally:
        store.close()


def test_reclaimer_backs_off_while_the_broker_fails_and_says_so(pg_url: str, tmp_path: Path) -> None:
    """Each failed pass doubles the wait (capped at 8 x STAGE_A_RECLAIM_INTERVAL) and is written to the
    host's reclaimers row, password hidden; the first good pass restores the interval and clears it."""
    _farm_run(pg_url, 2)
    down = RedisServer(tmp_path, password="s3cret-pw")  # not started yet
    settings = Settings(broker_url=down.url, database_url=pg_url, queue=QUEUE, reclaim_interval=1)
    store = ResultStore(pg_url)
    from stage_a.queue import TaskQueue

    reclaimer = Reclaimer(settings, store, host="test-host")
    reclaimer._queue = TaskQueue(settings, fail_fast=True)  # each failing pass fails in a second, not six
    waits: list[float] = []

    class Done(Exception):
        pass

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:  # four failed passes: the broker comes back
            [beat] = store.queries.reclaimer_beats()
            assert beat.failing_since is not None and f"127.0.0.1:{down.port}" in (beat.problem or "")
            assert "s3cret" not in (beat.problem or "")
            down.start()
        if len(waits) == 7:
            raise Done

    reclaimer.sleep = sleep
    try:
        with pytest.raises(Done):
            reclaimer.loop()
        assert waits == [1, 2, 4, 8, 8, 1, 1]
        [beat] = store.queries.reclaimer_beats()
        assert beat.host == "test-host" and beat.failing_since is None and beat.problem is None
    finally:
        down.kill()
        store.close()
