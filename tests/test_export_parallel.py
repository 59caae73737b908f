"""A large run's export in several processes writes the same bytes and counts as one process."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from merger.export import export_run
from stage_a.config import GenerationParams, RunSpec
from stage_a.store import GroupInput, ResultStore
from stage_a.work import ImageKey, ImageResult

MISSION = "挡风板安装检查"



def _run(store: ResultStore, n_groups: int = 97) -> int:
    groups = [GroupInput(f"QC-P-20240101-{g:07d}", "fail" if g % 4 == 0 else "pass",
                         tuple(f"{MISSION}/g{g}/photo_{i}.jpg" for i in range(1 + g % 3))) for g in range(n_groups)]
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/data/in", checkpoint="/m/x",
                   generation=GenerationParams(max_new_tokens=16))
    run = store.create_run(spec, groups)
    results = []
    for p, g in enumerate(groups):
        for i in range(1, len(g.images) + 1):
            if p % 11 == 5 and i == 1:
                continue  # pending: its group is incomplete
            ok = p % 7 != 3
            summary = f'{{"统计": [{{"类别": "BBU设备", "n": {p * 10 + i}}}], "备注": ["第{p}组"]}}'
            results.append(ImageResult(key=ImageKey(run, p, i), summary=summary if ok else None, raw_text=summary,
                                       error=None if ok else f"decode failed at {p}", generate_ms=float(p + i)))
    store.record_results(results, "w:1", model="m")
    return run


def test_parts_equal_one_process(store: ResultStore, tmp_path: Path) -> None:
    run = _run(store)
    one = export_run(store, run, tmp_path / "one", processes=1, parallel_min_images=1)
    three = export_run(store, run, tmp_path / "three", processes=3, parallel_min_images=1)
    assert one.groups_written > 50 and one.groups_failed and one.groups_incomplete
    assert (three.groups_written, three.groups_failed, three.groups_incomplete) == \
        (one.groups_written, one.groups_failed, one.groups_incomplete)
    for name in (one.jsonl_path.name, one.failures_path.name, one.report_path.name if one.report_path else ""):
        assert (tmp_path / "three" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not [p for p in (tmp_path / "three").iterdir() if p.name.startswith(".")]  # no part files left


def test_parts_equal_one_process_where_the_kernel_cannot_copy(store: ResultStore, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without copy_file_range (another OS, or a file system that refuses it) the parts are copied through
    the process: the same bytes."""
    run = _run(store, n_groups=41)
    one = export_run(store, run, tmp_path / "one", processes=1, parallel_min_images=1)

    def refuse(*_: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    two = export_run(store, run, tmp_path / "two", processes=2, parallel_min_images=1)
    for a, b in ((one.jsonl_path, two.jsonl_path), (one.failures_path, two.failures_path)):
        assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0


def test_small_runs_stay_in_one_process(store: ResultStore, tmp_path: Path) -> None:
    run = _run(store, 5)
    report = export_run(store, run, tmp_path / "out", processes=8, parallel_min_images=10**6)
    assert report.groups_written + report.groups_failed + report.groups_incomplete == 5
