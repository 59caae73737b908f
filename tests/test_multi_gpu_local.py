"""`stage-a run --gpus`: one pinned engine process per device over one store, tested with two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.store import image_rows

from producer.sample_data import make_sample_tree

pytestmark = pytest.mark.slow

MISSION = "挡风板安装检查"
JSONL = f"{MISSION}_stage_a.jsonl"


def stage_a(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STAGE_A_CACHE_DIR=str(cwd / "cache"), PYTHONIOENCODING="utf-8", COLUMNS="120")
    env.pop("STAGE_A_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def run_args(tree: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(out),
            "--checkpoint", str(checkpoint), "--max-new-tokens", "12", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_tree(tmp_path_factory.mktemp("multi") / "input", MISSION, n_fail=2, n_pass=2, seed=7)


def test_two_cpu_processes_match_a_single_process_run(tree: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    single = stage_a(run_args(tree, tmp_path / "single", tiny_checkpoint, "--device", "cpu"), tmp_path)
    assert single.returncode == 0, single.stderr
    multi = stage_a(run_args(tree, tmp_path / "multi", tiny_checkpoint, "--gpus", "cpu,cpu"), tmp_path)
    assert multi.returncode == 0, multi.stderr

    expected = (tmp_path / "single" / JSONL).read_bytes()
    assert expected.count(b"\n") == 4  # every group of the tree written
    assert (tmp_path / "multi" / JSONL).read_bytes() == expected

    from stage_a.store import ResultStore

    store = ResultStore(f"sqlite:///{tmp_path / 'multi' / 'stage_a_results.db'}")
    try:
        run = store.latest_run(MISSION)
        assert run is not None
        rows = image_rows(store, run.id)
    finally:
        store.close()
    assert rows and all(r["status"] == "done" and r["summary"] for r in rows)
    workers = {r["worker"] for r in rows}
    # Both ranks did work, each under its own name (host:pid/rankN), in its own process.
    assert {w.rsplit("/", 1)[-1] for w in workers} == {"rank0", "rank1"}, workers
    assert len({w.rsplit("/", 1)[0] for w in workers}) == 2, workers
    assert all(r["attempts"] <= 1 for r in rows)  # nobody processed an image twice


@pytest.mark.parametrize("gpus", ["0,x", "0,0", "1,,2"])
def test_bad_gpus_is_a_one_line_error(gpus: str, tree: Path, tmp_path: Path) -> None:
    proc = stage_a(run_args(tree, tmp_path / "out", tmp_path / "no-model", "--gpus", gpus), tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stage-a: error:") and "--gpus" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / JSONL).exists()
