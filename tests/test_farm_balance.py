"""Every pool process busy to the end: a worker's two pool processes share a run's last work.

A run's messages are chunks that shrink near its end, and a worker's flush is cut into shares of
what is left (workers/tasks.py), so at default settings neither process takes most of a run while
the other waits; the store's `worker` column (node:pid) says which process did each image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from support.farm import MISSION, Farm, cli, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import image_rows

pytestmark = pytest.mark.slow

BATCH = 8


def test_two_pool_processes_finish_a_153_image_run_within_one_model_batch(
        pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    make_tree(tmp_path / "in", groups=51, per_group=3)  # 153 images
    # The worker's defaults: STAGE_A_FLUSH_SIZE and its prefetch as an operator gets them.
    farm: Farm = farm_factory(pg_url, STAGE_A_FLUSH_SIZE="", STAGE_A_FLUSH_INTERVAL="")
    worker = farm.worker("w", concurrency=2)
    wait_for(worker.ready, 120, "the worker ready", on_timeout=farm.logs)
    enq = cli(["enqueue", "--mission", MISSION, "--input-dir", str(tmp_path / "in"), "--max-new-tokens", "4",
               "--batch-size", str(BATCH), "--sharding-mode", "per_image", "--checkpoint", str(farm.checkpoint)],
              farm.env(), tmp_path, timeout=120)
    assert enq.returncode == 0, enq.stdout + enq.stderr
    run_id = int(enq.stdout.rsplit("run_id=", 1)[1].split()[0])
    counts = farm.wait_finished(run_id, 600)
    assert (counts.done, counts.failed) == (153, 0), farm.logs()

    store = farm.store()
    try:
        rows = image_rows(store, run_id)
    finally:
        store.close()
    assert len({(r["group_position"], r["image_index"]) for r in rows}) == len(rows) == 153
    assert all(r["attempts"] == 1 for r in rows)  # each delivered once: nothing lost, nothing twice
    split = Counter(r["worker"] for r in rows)
    assert len(split) == 2, split  # both pool processes of the one worker
    low, high = sorted(split.values())
    assert high - low <= BATCH, split
