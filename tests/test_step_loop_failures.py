"""One failure policy for `stage-a run` and the farm: a batch whose generation raises fails alone.

The real tiny model, with generation made to raise for the batch holding one group's images
(support.faults). `stage-a run` must finish with exit 3, that group in the failure report with the
reason, every other group written; a real Celery worker must give the same JSONL and report.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from support.farm import FAILURES, JSONL, MISSION, PASS, base_env, farm_factory, image_bytes, make_tree  # noqa: F401
from support.faults import MARKER, MESSAGE

BAD_GROUP = f"QC-{MARKER}-20240101-0000001"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faulty") / "input"
    make_tree(root, groups=4, per_group=2)
    bad = root / MISSION / PASS / BAD_GROUP
    bad.mkdir(parents=True)
    for i in (1, 2):
        (bad / f"{BAD_GROUP}-{i}.jpg").write_bytes(image_bytes(900 + i, (64, 48)))
    return root


def _run(args: list[str], cwd: Path) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "support.faults", *args], capture_output=True, text=True,
                          env=base_env(STAGE_A_CACHE_DIR=str(cwd / "cache")), cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _check(out: Path) -> tuple[str, str]:
    jsonl = (out / JSONL).read_text(encoding="utf-8")
    failures = (out / FAILURES).read_text(encoding="utf-8")
    assert BAD_GROUP not in jsonl
    assert jsonl.count("\n") == 4, jsonl  # every other group is written
    assert BAD_GROUP in failures and MESSAGE in failures and "generation failed" in failures, failures
    return jsonl, failures


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_group", "per_image"])
def test_run_and_farm_fail_the_same_batch_alone(tree: Path, tmp_path: Path, tiny_checkpoint: Path,
                                                 farm_factory, pg_url: str, mode: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    # per_image sorts by length inside the run: the batch of 2 holding the bad images may hold
    # others, so the comparison with the farm is made in per_group mode, where batches are groups.
    code, log = _run(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                      "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "4",
                      "--batch-size", "2", "--sharding-mode", mode], tmp_path)
    assert code == 3, log
    assert "Traceback" not in log, log
    run_jsonl, run_failures = _check(tmp_path / "run")
    if mode != "per_group":
        return

    farm = farm_factory(pg_url, STAGE_A_FLUSH_SIZE="2")
    run_id = farm.enqueue(tree, "--sharding-mode", mode, "--batch-size", "2")
    farm.worker("faulty", app="support.faulty_app")
    farm.wait_finished(run_id, timeout=300)
    out = tmp_path / "farm"
    proc = farm.export(run_id, out)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    farm_jsonl, farm_failures = _check(out)
    assert farm_jsonl == run_jsonl
    assert farm_failures == run_failures
    assert farm.workers[0].alive()
    shutil.rmtree(out)
