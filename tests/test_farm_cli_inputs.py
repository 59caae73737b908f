"""What `enqueue` and `run` do with inputs a farm cannot serve, before anything is queued:
non-UTF-8 names are skipped with a warning; an input root outside STAGE_A_INPUT_ROOTS and a
checkpoint that is not a model are refused; no checkpoint is a loud warning. And `run --resume`
of a farm run serves the run's own model (the demo model for a run enqueued without one)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REDIS_URL
from support.cli import base_env, cli, read_jsonl
from support.farm import FAILURES, JSONL, MISSION, PASS, image_bytes, make_tree
from support.queues import clear, queued_images
from test_cli_errors import assert_one_line_error


@pytest.fixture()
def queue() -> Iterator[str]:
    """A queue of its own on the shared Redis, deleted afterwards."""
    import redis

    name = f"stage_a_test_{uuid.uuid4().hex[:8]}"
    yield name
    clear(redis.Redis.from_url(REDIS_URL), name)


def _queued(name: str) -> int:
    """Images carried by the messages on the queue and its per-model queues."""
    import redis

    return queued_images(redis.Redis.from_url(REDIS_URL), name)


def _runs(pg_url: str) -> int:
    from stage_a.store import ResultStore

    store = ResultStore(pg_url)
    try:
        latest = store.latest_run()
        return latest.id if latest else 0
    finally:
        store.close()


def _env(pg_url: str, queue: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=queue,
                    STAGE_A_CACHE_DIR=str(tmp_path / "cache"), **extra)


def _enqueue(tree: Path, *extra: str) -> list[str]:
    return ["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--max-new-tokens", "4", *extra]


# ---- non-UTF-8 names (item 7) ---------------------------------------------------------------


def _tree_with_bad_names(root: Path) -> Path:
    """Two good groups plus a non-UTF-8 name at every level: a label-level folder, a group folder
    and an image inside a good group."""
    make_tree(root, groups=2, per_group=2)
    mission = os.fsencode(root / MISSION)
    passed = os.fsencode(root / MISSION / PASS)
    os.makedirs(mission + b"/odd\xff")
    os.makedirs(passed + b"/QC-BAD-\xfe\xfe-0000001")
    with open(passed + b"/QC-BAD-\xfe\xfe-0000001/x.jpg", "wb") as f:
        f.write(image_bytes(1, (32, 32)))
    good = next(p for p in (root / MISSION / PASS).iterdir() if p.name.startswith("QC-REL"))
    with open(os.fsencode(good) + b"/z\xe9.jpg", "wb") as f:  # Latin-1 é: not UTF-8
        f.write(image_bytes(2, (32, 32)))
    return root


def _check_skips(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    for escaped in ("odd\\xff", "QC-BAD-\\xfe\\xfe-0000001", "z\\xe9.jpg"):
        assert any(escaped in ln and "skipping" in ln for ln in stderr.splitlines()), (escaped, stderr)


@pytest.mark.slow
def test_run_skips_non_utf8_names(tiny_checkpoint: Path, tmp_path: Path) -> None:
    tree = _tree_with_bad_names(tmp_path / "in")
    out = tmp_path / "out"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                "--output-dir", str(out), "--max-new-tokens", "2", "--device", "cpu"], base_env(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_skips(proc.stderr)
    records = read_jsonl(out / JSONL)
    assert [len(r["images"]) for r in records] == [2, 2]  # the bad image of a good group is left out
    assert (out / FAILURES).read_text() == ""


def test_enqueue_skips_non_utf8_names(pg_url: str, queue: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    tree = _tree_with_bad_names(tmp_path / "in")
    proc = cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint), "--sharding-mode", "per_image"),
               _env(pg_url, queue, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_skips(proc.stderr)
    assert "2 groups (2 found), 4 images" in proc.stdout
    assert _queued(queue) == 4


def test_non_utf8_input_root_is_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = os.fsencode(tmp_path) + b"/in\xff"
    os.makedirs(root)
    make_tree(Path(os.fsdecode(root)), groups=1, per_group=1)
    proc = cli(["run", "--mission", MISSION, "--input-dir", os.fsdecode(root), "--checkpoint", str(tiny_checkpoint),
                "--output-dir", str(tmp_path / "out")], base_env(), tmp_path)
    assert_one_line_error(proc, "in\\xff", "UTF-8")
    assert not (tmp_path / "out").exists()


# ---- enqueue's refusals ---------------------------------------------------------------------


def test_enqueue_refuses_a_root_outside_input_roots(pg_url: str, queue: str, tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    env = _env(pg_url, queue, tmp_path, STAGE_A_INPUT_ROOTS=str(allowed))
    assert_one_line_error(cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint)), env, tmp_path),
                          "STAGE_A_INPUT_ROOTS", str(tree))
    # Handed the mission folder inside an allowed root, the run's root would be its parent: refused too.
    env = _env(pg_url, queue, tmp_path, STAGE_A_INPUT_ROOTS=str(tree / MISSION))
    assert_one_line_error(cli(_enqueue(tree / MISSION, "--checkpoint", str(tiny_checkpoint)), env, tmp_path),
                          "STAGE_A_INPUT_ROOTS", str(tree))
    assert _queued(queue) == 0 and _runs(pg_url) == 0
    env = _env(pg_url, queue, tmp_path, STAGE_A_INPUT_ROOTS=os.pathsep.join([str(allowed), str(tmp_path)]))
    ok = cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint)), env, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("which", ["missing", "not-a-model"])
def test_enqueue_refuses_a_bad_checkpoint(pg_url: str, queue: str, tmp_path: Path, which: str) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2)
    ckpt = tmp_path / "ckpt"
    if which == "not-a-model":
        ckpt.mkdir()
        (ckpt / "README").write_text("weights elsewhere")
    for args, env in ((_enqueue(tree, "--checkpoint", str(ckpt)), _env(pg_url, queue, tmp_path)),
                      (_enqueue(tree), _env(pg_url, queue, tmp_path, STAGE_A_CHECKPOINT=str(ckpt)))):
        assert_one_line_error(cli(args, env, tmp_path), str(ckpt))
    assert _queued(queue) == 0 and _runs(pg_url) == 0


def test_enqueue_without_checkpoint_warns_about_the_demo_model(pg_url: str, queue: str, tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2)
    proc = cli(_enqueue(tree), _env(pg_url, queue, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo model" in proc.stderr and "meaningless" in proc.stderr, proc.stderr
    assert _queued(queue) == 4  # two groups of two images


# ---- run --resume of a farm run (item 10) ---------------------------------------------------


def _demo_cache(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A cache dir whose demo model is the session's tiny checkpoint (no second build)."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(tiny_checkpoint, cache / "models" / tiny_checkpoint.name)
    return cache


@pytest.mark.slow
def test_resume_of_a_farm_run_enqueued_without_checkpoint_uses_the_demo_model(
        pg_url: str, queue: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    tree = tmp_path / "in"
    expected = make_tree(tree, groups=4, per_group=2)
    _demo_cache(tmp_path, tiny_checkpoint)
    env = _env(pg_url, queue, tmp_path)
    enq = cli(_enqueue(tree, "--sharding-mode", "per_image"), env, tmp_path)
    assert enq.returncode == 0, enq.stdout + enq.stderr
    run_id = enq.stdout.rsplit("run_id=", 1)[1].split()[0]
    # No worker ever ran: the README's retry on one machine does the whole run, with the demo model.
    out = tmp_path / "out"
    proc = cli(["run", "--resume", "--run", run_id, "--db", pg_url, "--output-dir", str(out), "--device", "cpu"],
               env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo model" in proc.stderr
    assert [(r["group_id"], r["label"]) for r in read_jsonl(out / JSONL)] == expected
    # The same run resumed with a real checkpoint would mix two models: refused.
    again = cli(["run", "--resume", "--run", run_id, "--db", pg_url, "--output-dir", str(out), "--checkpoint",
                 str(tiny_checkpoint)], env, tmp_path)
    assert_one_line_error(again, "demo model")


@pytest.mark.slow
def test_resume_of_a_farm_run_serves_its_recorded_checkpoint(pg_url: str, queue: str, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    tree = tmp_path / "in"
    expected = make_tree(tree, groups=2, per_group=2)
    env = _env(pg_url, queue, tmp_path)
    enq = cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint)), env, tmp_path)
    assert enq.returncode == 0, enq.stdout + enq.stderr
    run_id = enq.stdout.rsplit("run_id=", 1)[1].split()[0]
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("{", '{"note": "another",', 1))
    out = tmp_path / "out"
    wrong = cli(["run", "--resume", "--run", run_id, "--db", pg_url, "--output-dir", str(out), "--checkpoint",
                 str(other)], env, tmp_path)
    assert_one_line_error(wrong, f"run {run_id}", str(other))
    proc = cli(["run", "--resume", "--run", run_id, "--db", pg_url, "--output-dir", str(out), "--device", "cpu"],
               env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo model" not in proc.stderr
    assert [(r["group_id"], r["label"]) for r in read_jsonl(out / JSONL)] == expected
