"""`stage-a export` SIGKILLed mid-write never leaves a partial file at the final path: the old
export stays intact (or, on a first export, there is none)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from support.farm import FAILURES, JSONL, MISSION, base_env, cli, cli_popen

from stage_a.config import RunSpec

pytestmark = pytest.mark.slow
N_GROUPS = 20_000  # ~40 MB of JSONL: the write takes long enough to be caught in the middle


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage_a.store import GroupInput, ResultStore
    from stage_a.work import ImageKey, ImageResult

    db = tmp_path_factory.mktemp("export_kill") / "results.db"
    store = ResultStore(f"sqlite:///{db}")
    groups = [GroupInput(f"QC-BIG-20240101-{g:07d}", ("fail", "pass")[g % 2], tuple(f"x/{g}/{i}.jpg" for i in "abc"))
              for g in range(N_GROUPS)]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups)
    summary = json.dumps({"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["很长的备注" * 40]},
                         ensure_ascii=False)
    results = [ImageResult(ImageKey(run_id, g, i), summary=f"{summary} {g}") for g in range(N_GROUPS) for i in (1, 2, 3)]
    for k in range(0, len(results), 30_000):
        store.record_results(results[k:k + 30_000], "test")
    store.close()
    return db


def _kill_mid_write(db: Path, out: Path, work: Path) -> int:
    """Start an export, SIGKILL it once its temp file holds > 1 MB; returns the temp file's size."""
    proc = cli_popen(["export", "1", "--db", str(db), "--output-dir", str(out)], base_env(), work, work / "export.log")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [e for e in os.scandir(out) if e.name.startswith(f".{JSONL}.") and e.name.endswith(".tmp")] \
                if out.is_dir() else []
            sizes = [t.stat().st_size for t in temps]
            if sizes and max(sizes) > 1_000_000:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return max(sizes)
            time.sleep(0.005)
        pytest.fail(f"export ended ({proc.poll()}) before it could be killed mid-write:\n"
                    f"{(work / 'export.log').read_text()}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    raise AssertionError("unreachable")


def test_killed_export_never_leaves_a_partial_file(big_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # First export killed mid-write: no file at the final path at all.
    _kill_mid_write(big_run, out, tmp_path)
    assert not (out / JSONL).exists() and not (out / FAILURES).exists()

    done = cli(["export", "1", "--db", str(big_run), "--output-dir", str(out)], base_env(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    old = (out / JSONL).read_bytes()
    assert old.count(b"\n") == N_GROUPS

    # A re-export killed mid-write: the previous export is untouched, byte for byte.
    partial = _kill_mid_write(big_run, out, tmp_path)
    assert 0 < partial < len(old)
    assert (out / JSONL).read_bytes() == old
    assert (out / FAILURES).read_bytes() == b""
    # The partial data only ever lived in a hidden temp file beside it.
    report = f"{MISSION}_stage_a_report.json"  # written with the pair, in the same atomic step
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([JSONL, FAILURES, report])
