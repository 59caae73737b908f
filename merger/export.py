"""Export a run: group-ordered JSONL of complete groups plus a failure report, both atomic."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from merger.jsonl_io import atomic_files
from stage_a.records import GroupRecord, image_keys
from stage_a.runstats import RunStats, run_stats
from stage_a.store import ExportGroup, ResultStore, RunInfo
from stage_a.store.models import DONE, FAILED


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


def export_run(store: ResultStore, run_id: int, output_dir: Path) -> ExportReport:
    """Stream the run's groups in order; write complete ones, report the rest. Memory stays flat."""
    run = store.get_run(run_id)
    output_dir = Path(output_dir)
    jsonl_path, failures_path = output_paths(output_dir, run.spec.mission)
    stats_path = report_path(output_dir, run.spec.mission)
    cancelled = None
    if run.cancelled:
        when = run.cancelled_at.strftime("%Y-%m-%d %H:%M:%S") + "Z" if run.cancelled_at else "?"
        cancelled = f"not processed: run cancelled at {when}"
    counts = {"written": 0, "failed": 0, "incomplete": 0}
    # The report's aggregates run in the database while this thread streams the groups (they read
    # the same rows; on one core each they take about as long).
    with ThreadPoolExecutor(max_workers=1) as pool:
        stats = pool.submit(run_stats, store, run_id)
        written = _write(store, run, run_id, jsonl_path, failures_path, stats_path, cancelled, counts, stats)
    return ExportReport(jsonl_path, failures_path, counts["written"], counts["failed"], counts["incomplete"],
                        tuple(store.queries.served_by(run_id)), written)


def _write(store: ResultStore, run: RunInfo, run_id: int, jsonl_path: Path, failures_path: Path, stats_path: Path,
           cancelled: str | None, counts: dict[str, int], stats: Future[RunStats]) -> Path:
    # The files are replaced together or not at all (a new JSONL never sits beside an old report).
    with atomic_files(jsonl_path, failures_path, stats_path) as (out, failures, stats_file):
        for group in store.queries.iter_export_groups(run_id):
            failure = _failure(group, cancelled)
            if failure is not None:
                counts[str(failure["status"])] += 1
                failures.write(json.dumps(failure, ensure_ascii=False) + "\n")
                continue
            record = GroupRecord(
                group_id=group.group_id, mission=run.spec.mission, label=group.label,
                images=[img.file_name for img in group.images],
                per_image=dict(zip(image_keys(len(group.images)), [img.summary or "" for img in group.images],
                                   strict=True)),
            )
            counts["written"] += 1
            out.write(record.to_json_line())  # validates before anything is written
        stats_file.write(json.dumps(stats.result().to_json(), ensure_ascii=False, indent=2) + "\n")
    return stats_path
