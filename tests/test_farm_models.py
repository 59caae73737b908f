"""A run with images that can never succeed finishes (which model serves a run: test_farm_routing.py).

Real Redis (the test's own), real PostgreSQL, real `celery -A workers worker` processes (issue 11, item 4):
- an image symlinked outside the input root, and a run whose input root is outside
  STAGE_A_INPUT_ROOTS, end as failed images: the run is finished, the failure report names them,
  and the reclaimer does not re-send them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from support.cli import cli, read_jsonl
from support.farm import FAILURES, JSONL, MISSION, Farm, Worker, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import dead_letters

pytestmark = pytest.mark.slow


def enqueue(farm: Farm, input_dir: Path, checkpoint: Path) -> int:
    proc = cli(["enqueue", "--mission", MISSION, "--input-dir", str(input_dir), "--max-new-tokens", "4",
                "--batch-size", "1", "--sharding-mode", "per_image", "--checkpoint", str(checkpoint)],
               farm.env(), farm.workdir, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.rsplit("run_id=", 1)[1].split()[0])


def test_images_that_can_never_succeed_fail_and_the_runs_finish(pg_url: str, farm_factory,  # noqa: F811
                                                                tmp_path: Path, tiny_checkpoint: Path) -> None:
    allowed = tmp_path / "allowed"
    groups = make_tree(allowed / "in", groups=2, per_group=2)
    secret = tmp_path / "secret.jpg"
    shutil.copy(next((allowed / "in").rglob("*.jpg")), secret)
    gid = groups[0][0]
    os.symlink(secret, allowed / "in" / MISSION / "审核不通过" / gid / f"{gid}-3.jpg")
    other = make_tree(tmp_path / "elsewhere", groups=1, per_group=2)

    farm: Farm = farm_factory(pg_url)
    worker = farm.worker("roots", STAGE_A_INPUT_ROOTS=str(allowed))
    wait_for(worker.ready, 90, "worker ready", on_timeout=farm.logs)
    run_link = enqueue(farm, allowed / "in", tiny_checkpoint)
    run_outside = enqueue(farm, tmp_path / "elsewhere", tiny_checkpoint)
    c1 = farm.wait_finished(run_link, 180)
    c2 = farm.wait_finished(run_outside, 60)
    assert (c1.done, c1.failed) == (4, 1) and (c2.done, c2.failed) == (0, 2)

    for run_id, n in ((run_link, 5), (run_outside, 2)):
        status = cli(["status", str(run_id)], farm.env(), farm.workdir)
        assert status.returncode == 0, status.stderr
        assert "state: finished" in status.stdout and f"images {n}/{n} finished" in status.stdout, status.stdout
    out = tmp_path / "out-link"
    exp = cli(["export", str(run_link), "--output-dir", str(out), "--require-finished"], farm.env(), farm.workdir)
    assert exp.returncode == 3, exp.stdout + exp.stderr  # finished, one group failed
    failures = read_jsonl(out / FAILURES)
    assert [(f["group_id"], f["images"][0]["file"]) for f in failures] == [(gid, f"{gid}-3.jpg")]
    assert "path leaves the input root" in failures[0]["images"][0]["reason"]
    out = tmp_path / "out-outside"
    exp = cli(["export", str(run_outside), "--output-dir", str(out), "--require-finished"], farm.env(), farm.workdir)
    assert exp.returncode == 3, exp.stdout + exp.stderr
    failures = read_jsonl(out / FAILURES)
    assert [f["group_id"] for f in failures] == [g for g, _ in other]
    assert all("outside STAGE_A_INPUT_ROOTS" in img["reason"] for f in failures for img in f["images"])

    # No loop: several orphan-grace periods later nothing was re-sent or dead-lettered again.
    store = farm.store()
    letters = len(dead_letters(store))
    time.sleep(3 * float(farm.settings["STAGE_A_ORPHAN_GRACE"]))
    assert len(dead_letters(store)) == letters == 3  # one per refused message (per_image: one per image)
    assert farm.redis.queued(farm.queue) == 0 and "re-enqueued" not in worker.log()
    store.close()
