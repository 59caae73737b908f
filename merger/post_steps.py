"""Optional steps after an export (`--postprocess`, `--add-gt-fail-reason`), shared by run and export."""

from __future__ import annotations

from pathlib import Path


def apply_post_steps(jsonl: Path, dataset: str, postprocess: bool, add_gt_fail_reason: bool,
                     excel_path: Path) -> list[str]:
    """Run the requested steps on the exported file in place; returns lines to show the user."""
    notes: list[str] = []
    if postprocess:
        from merger.postprocess import postprocess_file

        pp = postprocess_file(jsonl, inplace=True)
        notes.append(f"postprocess: {pp.records} records, {pp.summaries_changed} summaries changed")
    if add_gt_fail_reason:
        from merger.fail_reasons import add_fail_reasons_file

        fr = add_fail_reasons_file(jsonl, excel_path, dataset, inplace=True)
        notes.append(f"fail reasons attached to {fr.updated} records; {fr.fail_without_reason} of "
                     f"{fr.fail_records} fail records had none")
    return notes
