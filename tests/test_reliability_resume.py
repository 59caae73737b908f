"""`stage-a run` interrupted (Ctrl-C and SIGKILL), then `--resume` on the same database: only the
unfinished images are processed, and the JSONL is byte-identical to an uninterrupted greedy run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from support.counts import assert_counters_exact
from support.farm import FAILURES, JSONL, MISSION, base_env, cli, cli_popen, make_tree, wait_for

pytestmark = pytest.mark.slow
N_IMAGES = 16


def _run_args(tree: Path, out: Path, checkpoint: Path) -> list[str]:
    return ["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(out), "--checkpoint",
            str(checkpoint), "--device", "cpu", "--max-new-tokens", "6", "--batch-size", "2"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "in"
    make_tree(root, groups=8, per_group=2, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(tree: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    work = tmp_path_factory.mktemp("reference")
    proc = cli(_run_args(tree, work / "out", tiny_checkpoint), base_env(STAGE_A_CACHE_DIR=str(work / "cache")), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "out"


def _done(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT count(*) FROM images WHERE status IN ('done', 'failed')").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_run_resumes_only_unfinished_and_matches_uninterrupted(
        sig: int, tree: Path, tiny_checkpoint: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    db = out / "stage_a_results.db"
    env = base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache"))
    log = tmp_path / "first.log"
    proc = cli_popen(_run_args(tree, out, tiny_checkpoint), env, tmp_path, log)
    try:
        wait_for(lambda: _done(db) >= 2 or proc.poll() is not None, 120, "the first batch to be stored", 0.05)
        os.killpg(proc.pid, sig)  # like Ctrl-C in a terminal (the whole foreground group), or a hard kill
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    first = log.read_text(encoding="utf-8", errors="replace")
    if sig == signal.SIGINT:
        assert proc.returncode == 130, first
        assert "interrupted; finished batches are saved" in first and "--resume" in first, first
        assert "Traceback" not in first, first
    else:
        assert proc.returncode == -signal.SIGKILL
    finished = _done(db)
    assert 2 <= finished < N_IMAGES, "the interruption must land mid-run"
    left = N_IMAGES - finished

    resumed = cli(["run", "--resume", "--run", "1", "--db", str(db), "--output-dir", str(out), "--device", "cpu"],
                  env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming run 1: {left} unfinished images to process" in resumed.stderr, resumed.stderr
    assert f" {left} images in " in resumed.stdout, resumed.stdout
    assert (out / JSONL).read_bytes() == (reference / JSONL).read_bytes()
    assert (out / FAILURES).read_bytes() == (reference / FAILURES).read_bytes()
    assert _done(db) == N_IMAGES
    engine = create_engine(f"sqlite:///{db}")
    assert_counters_exact(engine)  # the kill and the resume left the run counters exact
    engine.dispose()


def _rank_processes(parent: int) -> list[int]:
    """The engine processes `stage-a run --gpus` spawned (children running multiprocessing's spawn_main)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_process_run_with_its_parent_killed_leaves_no_orphan_and_resumes(
        tree: Path, tiny_checkpoint: Path, reference: Path, tmp_path: Path) -> None:
    """SIGKILL of `stage-a run --gpus cpu,cpu` itself (not its group: the OOM killer, `kill -9 PID`):
    its engine processes die with it instead of writing on beside the resume, on the same devices."""
    out = tmp_path / "out"
    db = out / "stage_a_results.db"
    env = base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache"))
    proc = cli_popen([*_run_args(tree, out, tiny_checkpoint), "--gpus", "cpu,cpu"], env, tmp_path,
                     tmp_path / "first.log")
    ranks: list[int] = []
    try:
        wait_for(lambda: _done(db) >= 2 or proc.poll() is not None, 180, "the first batch to be stored", 0.05)
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2, (ranks, (tmp_path / "first.log").read_text(errors="replace"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        wait_for(lambda: not any(_alive(r) for r in ranks), 5, "the engine processes to die with their parent")
    finally:
        for r in ranks:
            if _alive(r):
                os.kill(r, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    finished = _done(db)
    assert finished < N_IMAGES, "the engine processes worked on to the end after their parent was killed"

    resumed = cli(["run", "--resume", "--run", "1", "--db", str(db), "--output-dir", str(out), "--device", "cpu",
                   "--gpus", "cpu,cpu"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming run 1: {N_IMAGES - finished} unfinished images to process" in resumed.stderr, resumed.stderr
    assert (out / JSONL).read_bytes() == (reference / JSONL).read_bytes()
    assert _done(db) == N_IMAGES


def test_resume_of_a_finished_run_processes_nothing(reference: Path, tmp_path: Path) -> None:
    """Resuming twice is harmless: zero images, the same bytes."""
    before = (reference / JSONL).read_bytes()
    proc = cli(["run", "--resume", "--db", str(reference / "stage_a_results.db"), "--output-dir", str(reference),
                "--device", "cpu"], base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache")), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 unfinished images" in proc.stderr and " 0 images in " in proc.stdout
    assert (reference / JSONL).read_bytes() == before


    assert "ignored" not in proc.stderr  # nothing given that the resume does not use


def test_resume_says_which_options_it_does_not_use(reference: Path, tmp_path: Path) -> None:
    """A resume continues with the run's recorded options; those given again are named, never mixed in."""
    before = (reference / JSONL).read_bytes()
    proc = cli(["run", "--resume", "--db", str(reference / "stage_a_results.db"), "--output-dir", str(reference),
                "--device", "cpu", "--max-new-tokens", "3", "--sample-seed", "7"],
               base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache")), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "ignored" in ln]
    assert len(warning) == 1 and "--max-new-tokens, --sample-seed ignored" in warning[0], proc.stderr
    assert "--device" not in warning[0]  # used by the resume
    assert (reference / JSONL).read_bytes() == before
