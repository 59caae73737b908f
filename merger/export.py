"""Export a run: group-ordered JSONL of complete groups plus a failure report, both atomic."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from merger.jsonl_io import atomic_files
from stage_a.records import GroupRecord, image_keys
from stage_a.runstats import run_stats
from stage_a.store import ExportGroup, ResultStore
from stage_a.store.models import DONE, FAILED

WRITE_GROUPS = 2000
"""Records joined into one write."""


@dataclass(frozen=True)
class ExportReport:
    jsonl_path: Path
    failures_path: Path
    groups_written: int
    groups_failed: int  # at least one image failed
    groups_incomplete: int  # images still pending/leased (run not finished)
    models: tuple[tuple[str, int], ...] = ()
    """(model fingerprint, images summarized) of the models that served the run."""
    report_path: Path | None = None
    """The end-of-run report (stage_a.runstats) written beside the JSONL."""

    @property
    def groups_not_written(self) -> int:
        return self.groups_failed + self.groups_incomplete


def output_paths(output_dir: Path, mission: str) -> tuple[Path, Path]:
    return output_dir / f"{mission}_stage_a.jsonl", output_dir / f"{mission}_stage_a_failures.jsonl"


def report_path(output_dir: Path, mission: str) -> Path:
    return output_dir / f"{mission}_stage_a_report.json"


def _failure(group: ExportGroup, cancelled: str | None) -> dict[str, object] | None:
    """The group's failure record, or None when every image has a summary; ``cancelled``: the text
    for images a cancelled run left unprocessed (None: the run is not cancelled)."""
    problems: list[dict[str, str | None]] = []
    incomplete = False
    for i, img in enumerate(group.images, start=1):
        if img.status == DONE and img.summary:
            continue
        if img.status == FAILED:
            reason = img.error or "failed"
        elif img.status == DONE:
            reason = "empty summary"
        else:
            reason = cancelled or f"not processed yet ({img.status})"
            incomplete = True
        problems.append({"image": f"image_{i}", "file": img.file_name, "reason": reason})
    if not problems and group.images:
        return None
    if not group.images:
        problems.append({"image": None, "file": None, "reason": "group has no image rows"})
    return {
        "group_id": group.group_id,
        "label": group.label,
        "position": group.position,
        "status": "incomplete" if incomplete else "failed",
        "images": problems,
    }


def export_run(store: ResultStore, run_id: int, output_dir: Path, processes: int = 1,
               parallel_min_images: int = 200_000) -> ExportReport:
    """Stream the run's groups in order; write complete ones, report the rest. Memory stays flat.

    A run of at least ``parallel_min_images`` images is encoded by ``processes`` processes, each over
    its own contiguous range of groups into a part file; the parts are then copied in order into the
    output files, so the bytes are the same as from one process."""
    run = store.get_run(run_id)
    output_dir = Path(output_dir)
    jsonl_path, failures_path = output_paths(output_dir, run.spec.mission)
    stats_path = report_path(output_dir, run.spec.mission)
    cancelled = None
    if run.cancelled:
        when = run.cancelled_at.strftime("%Y-%m-%d %H:%M:%S") + "Z" if run.cancelled_at else "?"
        cancelled = f"not processed: run cancelled at {when}"
    counts = {"written": 0, "failed": 0, "incomplete": 0}
    parts = max(1, min(processes, run.n_groups)) if run.n_images >= parallel_min_images else 1
    # The report's aggregates run in the database while the groups stream (they read the same rows).
    with ThreadPoolExecutor(max_workers=1) as pool:
        stats = pool.submit(run_stats, store, run_id)
        # The files are replaced together or not at all (a new JSONL never sits beside an old report).
        with atomic_files(jsonl_path, failures_path, stats_path) as (out, failures, stats_file):
            if parts == 1:
                _encode_groups(store.queries.iter_export_groups(run_id), run.spec.mission, cancelled, counts,
                               out.write, failures.write)
            else:
                _encode_in_parts(store, run_id, run.n_groups, parts, run.spec.mission, cancelled, counts,
                                 out, failures, output_dir)
            stats_file.write(json.dumps(stats.result().to_json(), ensure_ascii=False, indent=2) + "\n")
    return ExportReport(jsonl_path, failures_path, counts["written"], counts["failed"], counts["incomplete"],
                        tuple(store.queries.served_by(run_id)), stats_path)


def _encode_groups(groups: Iterable[ExportGroup], mission: str, cancelled: str | None, counts: dict[str, int],
                   write: Callable[[str], Any], write_failure: Callable[[str], Any]) -> None:
    """Each group as its JSONL record (validated) or its failure record, counted in ``counts``; written
    WRITE_GROUPS lines at a time (one write of many lines costs less than many writes)."""
    lines: list[str] = []
    failed: list[str] = []
    for group in groups:
        failure = _failure(group, cancelled)
        if failure is not None:
            counts[str(failure["status"])] += 1
            failed.append(json.dumps(failure, ensure_ascii=False) + "\n")
            if len(failed) >= WRITE_GROUPS:
                write_failure("".join(failed))
                failed.clear()
            continue
        record = GroupRecord(
            group_id=group.group_id, mission=mission, label=group.label,
            images=[img.file_name for img in group.images],
            per_image=dict(zip(image_keys(len(group.images)), [img.summary or "" for img in group.images],
                               strict=True)),
        )
        counts["written"] += 1
        lines.append(record.to_json_line())  # validates before anything is written
        if len(lines) >= WRITE_GROUPS:
            write("".join(lines))
            lines.clear()
    if lines:
        write("".join(lines))
    if failed:
        write_failure("".join(failed))


def _encode_in_parts(store: ResultStore, run_id: int, n_groups: int, parts: int, mission: str, cancelled: str | None,
                     counts: dict[str, int], out: TextIO, failures: TextIO, output_dir: Path) -> None:
    """The first range of groups is encoded here, straight into the output files, while ``parts`` - 1 spawned
    processes encode the others into part files, which are then appended in order (in the kernel)."""
    bounds = [n_groups * i // parts for i in range(parts + 1)]
    with tempfile.TemporaryDirectory(prefix=".stage-a-export-", dir=output_dir) as tmp, \
            ProcessPoolExecutor(max_workers=parts - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_export_part, store.url, run_id, bounds[i], bounds[i + 1] - 1, mission, cancelled,
                               Path(tmp) / f"part-{i}") for i in range(1, parts)]
        _encode_groups(store.queries.iter_export_groups(run_id, first=0, last=bounds[1] - 1), mission, cancelled,
                       counts, out.write, failures.write)
        for target, suffix in ((out, "jsonl"), (failures, "failures")):
            target.flush()
            for i, future in enumerate(futures, start=1):
                part_counts = future.result()
                if target is out:
                    for k, v in part_counts.items():
                        counts[k] += v
                _append(Path(tmp) / f"part-{i}.{suffix}", target)


def _append(path: Path, target: TextIO) -> None:
    """Append the file at ``path`` to ``target`` (flushed): copy_file_range where the kernel offers it."""
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(src.fileno(), target.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except (AttributeError, OSError):  # no copy_file_range (or not between these files): copy through here
            pass
        if done < size:
            src.seek(done)
            shutil.copyfileobj(src, target.buffer, 16 << 20)
            target.buffer.flush()


def _export_part(url: str, run_id: int, first: int, last: int, mission: str, cancelled: str | None,
                 stem: Path) -> dict[str, int]:
    """One process's range of groups (positions first..last) into ``stem``.jsonl and ``stem``.failures."""
    store = ResultStore(url, migrate=False, pool_size=2)
    counts = {"written": 0, "failed": 0, "incomplete": 0}
    try:
        with open(f"{stem}.jsonl", "w", encoding="utf-8", newline="\n") as out, \
                open(f"{stem}.failures", "w", encoding="utf-8", newline="\n") as failures:
            _encode_groups(store.queries.iter_export_groups(run_id, first=first, last=last), mission, cancelled,
                           counts, out.write, failures.write)
    finally:
        store.close()
    return counts
