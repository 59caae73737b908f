"""Export on a full or read-only disk: one-line error, the old JSONL and failure report intact, and the
pair replaced together or not at all (a failed second rename puts the first file back)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import FAILURES, JSONL, MISSION
from test_cli_errors import assert_one_line_error

from stage_a.config import RunSpec

N_GROUPS = 12
SUMMARY = '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["' + "很长的备注" * 60 + '"]}'

REPORT = f"{MISSION}_stage_a_report.json"


def _mount(target: Path, *opts: str) -> None:
    proc = subprocess.run(["mount", *opts, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}): needs root in a "
                    f"container that allows mount")


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of its own (unmounted afterwards)."""
    target = tmp_path / "disk"
    target.mkdir()
    _mount(target, "-t", "tmpfs", "-o", "size=256k", "tmpfs")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture()
def half_done(tmp_path: Path) -> tuple[Path, Path]:
    """A run whose first half of the groups is summarized, the rest pending; returns (db, sqlite url)."""
    from stage_a.store import GroupInput, ResultStore
    from stage_a.work import ImageKey, ImageResult

    db = tmp_path / "results.db"
    store = ResultStore(f"sqlite:///{db}")
    groups = [GroupInput(f"QC-DISK-20240101-{g:07d}", "pass", (f"x/{g}/a.jpg", f"x/{g}/b.jpg"))
              for g in range(N_GROUPS)]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups)
    store.record_results([ImageResult(ImageKey(run_id, g, i), summary=SUMMARY) for g in range(N_GROUPS // 2)
                          for i in (1, 2)], "test")
    store.close()
    return db, tmp_path


def _finish_run(db: Path) -> None:
    from stage_a.store import ResultStore
    from stage_a.work import ImageKey, ImageResult

    store = ResultStore(f"sqlite:///{db}")
    store.record_results([ImageResult(ImageKey(1, g, i), summary=SUMMARY) for g in range(N_GROUPS // 2, N_GROUPS)
                          for i in (1, 2)], "test")
    store.close()


def _export(db: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli(["export", "1", "--db", str(db), "--output-dir", str(out)], base_env(), cwd)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_export_on_a_full_disk_keeps_the_old_pair(half_done: tuple[Path, Path], small_disk: Path) -> None:
    db, work = half_done
    first = _export(db, small_disk, work)
    assert first.returncode == 3, first.stdout + first.stderr  # half the groups still pending
    old = _snapshot(small_disk)
    assert set(old) == {JSONL, FAILURES, REPORT} and old[JSONL] and old[FAILURES] and old[REPORT]
    _finish_run(db)  # the next export would write every group and an empty report
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 8192))  # leave 8 KiB: less than the new JSONL
    line = assert_one_line_error(_export(db, small_disk, work), "cannot write", "No space left on device")
    assert str(small_disk) in line
    (small_disk / "filler").unlink()
    assert _snapshot(small_disk) == old  # both old files, byte for byte, and no temp file left behind
    done = _export(db, small_disk, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (small_disk / FAILURES).read_bytes() == b"" and (small_disk / JSONL).read_bytes().count(b"\n") == N_GROUPS


def test_export_on_a_read_only_disk_keeps_the_old_pair(half_done: tuple[Path, Path], small_disk: Path) -> None:
    db, work = half_done
    assert _export(db, small_disk, work).returncode == 3
    old = _snapshot(small_disk)
    _finish_run(db)
    _mount(small_disk, "-o", "remount,ro")
    line = assert_one_line_error(_export(db, small_disk, work), "cannot write", "Read-only file system")
    assert str(small_disk) in line
    assert _snapshot(small_disk) == old


def test_failed_second_rename_puts_the_first_file_back(half_done: tuple[Path, Path]) -> None:
    """The failure report cannot be replaced (a folder holds its name): the new JSONL is taken back."""
    db, work = half_done
    out = work / "out"
    assert _export(db, out, work).returncode == 3
    old_jsonl = (out / JSONL).read_bytes()
    (out / FAILURES).unlink()
    (out / FAILURES).mkdir()
    (out / FAILURES / "keep").write_text("x")
    _finish_run(db)
    assert_one_line_error(_export(db, out, work), "cannot write", FAILURES)
    assert (out / JSONL).read_bytes() == old_jsonl
    assert sorted(p.name for p in out.iterdir()) == sorted([JSONL, FAILURES, REPORT])  # no temp or backup left


def test_export_into_an_unwritable_place_is_one_line(half_done: tuple[Path, Path]) -> None:
    db, work = half_done
    _finish_run(db)
    blocker = work / "file"
    blocker.write_text("x")
    assert_one_line_error(_export(db, blocker / "out", work), str(blocker))
