"""The database is unavailable while a worker writes its results: it retries with backoff, and the
batch's messages stay unacknowledged on the broker until the results are stored.

The outage is an SQLite file locked by another writer (`BEGIN EXCLUSIVE` held for seconds) while
a real worker finishes generating; STAGE_A_SQLITE_BUSY_TIMEOUT makes each attempt give up fast so
the store's retry loop, not SQLite's busy wait, is what bridges the outage. `stage-a enqueue`
refuses an SQLite store (workers on other hosts cannot share the file), so this one-host farm's
run is registered and published in-process.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from support.farm import MISSION, Farm, check_rows, farm_factory, make_tree, wait_for  # noqa: F401

pytestmark = pytest.mark.slow
RETRY_LINE = "storing results failed (database is locked); retry"


def _enqueue_in_process(farm: Farm, input_dir: Path) -> int:
    from producer.publish import Publisher
    from producer.register import register_run
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.settings import Settings

    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", checkpoint=str(farm.checkpoint), batch_size=4,
                   sharding_mode="per_image", generation=GenerationParams(max_new_tokens=12))
    store = farm.store()
    try:
        run_id = register_run(store, spec, input_dir, farm=True).run_id
        publisher = Publisher(Settings(broker_url=farm.redis.url, database_url=farm.db_url, queue=farm.queue))
        publisher.publish_items(store.unfinished_items(run_id), "per_image", store.store_id)
    finally:
        store.close()
    return run_id


def test_locked_sqlite_results_are_retried_and_acked_only_after_stored(farm_factory, tmp_path: Path) -> None:  # noqa: F811
    make_tree(tmp_path / "in", groups=2, per_group=2)  # 4 images = exactly one batch of 4
    db = tmp_path / "results.db"
    farm: Farm = farm_factory(f"sqlite:///{db}", STAGE_A_LEASE_SECONDS="60", STAGE_A_SQLITE_BUSY_TIMEOUT="0.3",
                             STAGE_A_FLUSH_INTERVAL="3")  # the 4 queued messages flush as one batch
    run_id = _enqueue_in_process(farm, tmp_path / "in")
    worker = farm.worker("db")

    reader = sqlite3.connect(db, timeout=10, isolation_level=None)

    def statuses() -> list[str]:
        return [s for (s,) in reader.execute("SELECT status FROM images WHERE run_id=? ORDER BY 1", (run_id,))]

    # The batch is leased (the worker is generating): take the write lock before it writes results.
    wait_for(lambda: "leased" in statuses(), 120, "the batch to be leased", 0.02, on_timeout=farm.logs)
    reader.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    try:
        wait_for(lambda: worker.log().count(RETRY_LINE) >= 2, 60, "the worker to retry its result write",
                 0.1, on_timeout=farm.logs)
        # Generation is over but nothing is stored: every image of the batch is still unacked (the
        # run's last chunks are small, so the batch may hold only some of the run's 4 images).
        leased = statuses().count("leased")
        assert leased >= 1 and farm.redis.unacked_images() == leased
        assert set(statuses()) <= {"leased", "pending"}
        time.sleep(max(0.0, 4 - (time.monotonic() - locked_at)))  # a few seconds of outage in all
    finally:
        reader.execute("ROLLBACK")

    # Acknowledged only after stored: whenever the broker shows no unacked message, rows are done.
    deadline = time.monotonic() + 60
    while True:
        unacked = farm.redis.unacked()
        st = statuses()
        if unacked == 0:
            assert st == ["done"] * 4, st
            break
        assert time.monotonic() < deadline, (unacked, st, farm.logs())
        time.sleep(0.05)
    reader.close()
    store = farm.store()
    rows = check_rows(store, run_id, 4)
    assert all(r["attempts"] == 1 for r in rows)  # the retry bridged the outage, no redelivery needed
    store.close()
    assert worker.alive() and farm.redis.queued(farm.queue) == 0
