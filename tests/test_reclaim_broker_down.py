"""The reclaimer records "re-enqueued" only once the messages are published: with Redis down,
`stage-a reclaim` is a one-line error and the expired leases stay expired for the next pass."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import MISSION, RedisServer, free_port
from support.store import claim_orphans, release
from test_cli_errors import assert_one_line_error

from stage_a.config import RunSpec

N_IMAGES = 6
QUEUE = "stage_a_reclaim_test"


def _farm_run(pg_url: str) -> tuple[int, list]:  # type: ignore[type-arg]
    from stage_a.store import GroupInput, ResultStore

    store = ResultStore(pg_url)
    groups = [GroupInput(f"QC-RCL-20240101-{g:07d}", "pass", (f"x/{g}/a.jpg", f"x/{g}/b.jpg"))
              for g in range(N_IMAGES // 2)]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups, farm=True)
    items = store.unfinished_items(run_id)
    store.close()
    return run_id, items


def _env(pg_url: str, broker: str, **extra: str) -> dict[str, str]:
    return base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=broker, STAGE_A_QUEUE=QUEUE, **extra)


@pytest.mark.slow
def test_reclaim_with_redis_down_keeps_leases_expired(pg_url: str, tmp_path: Path) -> None:
    from stage_a.store import ResultStore

    run_id, items = _farm_run(pg_url)
    store = ResultStore(pg_url)
    store.lease([it.key for it in items], "dead-worker", -60)  # a worker that died a minute ago
    assert len(store.stale_leases()) == N_IMAGES
    redis = RedisServer(tmp_path)
    try:
        down = cli(["reclaim"], _env(pg_url, redis.url), tmp_path, timeout=120)
        assert_one_line_error(down, "broker", f"127.0.0.1:{redis.port}")
        # Nothing was recorded as re-enqueued: every lease is still expired, ready for the next pass.
        assert sorted(it.key for it in store.stale_leases()) == sorted(it.key for it in items)

        redis.start()
        up = cli(["reclaim"], _env(pg_url, redis.url), tmp_path, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"re-enqueued {N_IMAGES} expired" in up.stdout
        assert redis.queued_images(QUEUE) == N_IMAGES
        assert store.stale_leases() == []
    finally:
        redis.kill()
        store.close()


def test_orphan_claim_is_rolled_back_when_publishing_fails(pg_url: str) -> None:
    """The orphan path: a claim whose publishing raised is not kept; the next reclaimer wins it."""
    from stage_a.store import ResultStore, utcnow

    run_id, items = _farm_run(pg_url)
    store = ResultStore(pg_url)
    try:
        assert store.orphaned_pending(60.0) == []  # just registered: within the grace period
        later = utcnow() + timedelta(seconds=61)  # the grace period has passed, without waiting for it
        orphans = store.orphaned_pending(60.0, now=later)
        assert len(orphans) == N_IMAGES
        with pytest.raises(ConnectionError), store.claiming_orphans(orphans, 60.0, later) as won:
            assert len(won) == N_IMAGES
            raise ConnectionError("broker down")
        assert len(store.orphaned_pending(60.0, now=later)) == N_IMAGES
        assert len(claim_orphans(store, orphans, 60.0, later)) == N_IMAGES  # claimed for real this time
        assert claim_orphans(store, orphans, 60.0, later) == []
    finally:
        store.close()


def test_expired_lease_claim_is_rolled_back_when_publishing_fails(pg_url: str) -> None:
    from stage_a.store import ResultStore

    _, items = _farm_run(pg_url)
    store = ResultStore(pg_url)
    try:
        store.lease([it.key for it in items], "dead-worker", -60)
        stale = store.stale_leases()
        with pytest.raises(ConnectionError), store.releasing(stale, 600) as won:
            assert len(won) == N_IMAGES
            raise ConnectionError("broker down")
        assert len(release(store, store.stale_leases(), 600)) == N_IMAGES
        assert store.stale_leases() == []
    finally:
        store.close()


@pytest.mark.slow
def test_reclaim_with_redis_down_before_the_orphan_check(pg_url: str, tmp_path: Path) -> None:
    _farm_run(pg_url)
    broker = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    proc = cli(["reclaim"], _env(pg_url, broker, STAGE_A_ORPHAN_GRACE="1"), tmp_path, timeout=120)
    line = assert_one_line_error(proc, "broker")
    assert "s3cret" not in proc.stdout + proc.stderr and "***" in line
