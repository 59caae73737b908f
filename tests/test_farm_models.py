"""A farm serves exactly the model a run names, and a run with images that can never succeed finishes.

Real Redis (the test's own), real PostgreSQL, real `celery -A workers worker` processes (issue 11,
items 1 and 4):
- a run enqueued with checkpoint A is never summarized by a worker pinned to model B (it hands the
  messages back, backing off); a worker with no STAGE_A_CHECKPOINT then loads A and the export is
  byte-identical to `stage-a run --checkpoint A`, every row recording A;
- an image symlinked outside the input root, and a run whose input root is outside
  STAGE_A_INPUT_ROOTS, end as failed images: the run is finished, the failure report names them,
  and the reclaimer does not re-send them.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from support.cli import base_env, cli, read_jsonl
from support.farm import FAILURES, JSONL, MISSION, Farm, Worker, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import dead_letters, image_rows

pytestmark = pytest.mark.slow


def enqueue(farm: Farm, input_dir: Path, checkpoint: Path) -> int:
    proc = cli(["enqueue", "--mission", MISSION, "--input-dir", str(input_dir), "--max-new-tokens", "4",
                "--batch-size", "4", "--sharding-mode", "per_image", "--checkpoint", str(checkpoint)],
               farm.env(), farm.workdir, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.rsplit("run_id=", 1)[1].split()[0])


def test_a_run_is_served_by_its_model_only(pg_url: str, farm_factory, tiny_checkpoint: Path,  # noqa: F811
                                           other_checkpoint: Path, tmp_path: Path) -> None:
    from stage_a.checkpoint import Checkpoint

    model_a, model_b = Checkpoint.open(other_checkpoint).identity, Checkpoint.open(tiny_checkpoint).identity
    assert model_a != model_b
    make_tree(tmp_path / "in", groups=3, per_group=2)
    ref = cli(["run", "--mission", MISSION, "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "ref"),
               "--checkpoint", str(other_checkpoint), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4"],
              base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache")), tmp_path)
    assert ref.returncode == 0, ref.stderr

    farm: Farm = farm_factory(pg_url)  # its workers are pinned to tiny_checkpoint (model B)
    pinned = farm.worker("pinned-b")
    wait_for(pinned.ready, 90, "pinned worker ready", on_timeout=farm.logs)
    run_id = enqueue(farm, tmp_path / "in", other_checkpoint)
    wait_for(lambda: pinned.log().count("handed ") >= 3, 60, "the pinned worker to hand the run back",
             on_timeout=farm.logs)
    store = farm.store()
    rows = image_rows(store, run_id)
    assert all(r["status"] == "pending" and r["attempts"] == 0 and r["model"] is None for r in rows), rows
    assert "nothing this worker serves" in pinned.log()  # it backs off instead of spinning

    env = {k: v for k, v in farm.env().items() if k != "STAGE_A_CHECKPOINT"}
    free = Worker("unpinned", env, farm.workdir).start()
    farm.workers.append(free)
    wait_for(free.ready, 90, "unpinned worker ready", on_timeout=farm.logs)
    pinned.assert_alive()
    # The pinned worker leaves (warm shutdown: what it holds goes back to the queue). Left running, it
    # kept winning the run's last re-published message from the idle unpinned worker for 3 minutes in
    # one CI run (an open finding, see the stop note); this test is about who serves, not that race.
    assert pinned.proc is not None
    os.kill(pinned.proc.pid, signal.SIGTERM)
    assert pinned.proc.wait(60) == 0
    farm.workers.remove(pinned)  # gone on purpose: the farm's liveness checks skip it
    counts = farm.wait_finished(run_id, 180)
    assert (counts.done, counts.failed) == (6, 0)
    rows = image_rows(store, run_id)
    assert {r["model"] for r in rows} == {model_a}, {r["model"] for r in rows}
    assert {r["engine"] for r in rows} == {"transformers"}
    assert all(r["attempts"] == 1 for r in rows)  # handing back never counted a delivery
    store.close()

    exp = cli(["export", str(run_id), "--output-dir", str(tmp_path / "out"), "--require-finished"], farm.env(),
              farm.workdir)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert (tmp_path / "out" / JSONL).read_bytes() == (tmp_path / "ref" / JSONL).read_bytes()
    assert f"models:   {model_a} (6 images)" in exp.stdout, exp.stdout


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
