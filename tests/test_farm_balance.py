"""Every pool process busy to the end: a worker's two pool processes share a run's last work.

A run's messages are chunks that shrink near its end, and a worker's flush is cut into shares of
what is left (workers/tasks.py), so at default settings neither process takes most of a run while
the other waits. The store says which process did each image (`worker`, node:pid) and when each
model batch was written (one results commit: one `updated_at` per process). Processes need not do
the same number of images (a busier core makes one slower); they must finish together.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
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
    commits = {w: sorted({r["updated_at"] for r in rows if r["worker"] == w}) for w in split}
    (early, _), (late, late_commits) = sorted(commits.items(), key=lambda kv: kv[1][-1])
    # One model batch's time here: the longest a process took between two of its commits.
    batch_s = max((b - a).total_seconds() for ts in commits.values() for a, b in pairwise(ts))
    idle_s = (late_commits[-1] - commits[early][-1]).total_seconds()
    assert idle_s <= batch_s, (f"{early} sat idle {idle_s:.2f} s while {late} worked on; one model batch takes "
                               f"at most {batch_s:.2f} s here", split)
