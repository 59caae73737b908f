"""Optional steps after an export (`--postprocess`, `--add-gt-fail-reason`), shared by run and export."""

from __future__ import annotations

from pathlib import Path


def check_post_steps(dataset: str, add_gt_fail_reason: bool, excel_path: Path) -> None:
    """Before any inference: the Excel of --add-gt-fail-reason exists, is readable and fits the
    dataset (a UserError now rather than after hours of generation)."""
    if not add_gt_fail_reason:
        return
    from merger.fail_reasons import SUPPORTED_DATASETS, load_fail_reasons
    from stage_a.errors import UserError

    if dataset not in SUPPORTED_DATASETS:
        raise UserError(f"--add-gt-fail-reason is supported for BBU only (this run's dataset is {dataset})")
    load_fail_reasons(excel_path)


def apply_post_steps(jsonl: Path, dataset: str, postprocess: bool, add_gt_fail_reason: bool,
                     excel_path: Path, data_dir: str) -> list[str]:
    """Run the requested steps on the exported file in place; returns lines to show the user.
    ``data_dir``: the mission data folder (Settings.data_dir)."""
    notes: list[str] = []
    if postprocess:
        from merger.postprocess import postprocess_file

        pp = postprocess_file(jsonl, inplace=True)
        notes.append(f"postprocess: {pp.records} records, {pp.summaries_changed} summaries changed")
    if add_gt_fail_reason:
        from merger.fail_reasons import add_fail_reasons_file

        fr = add_fail_reasons_file(jsonl, excel_path, dataset, inplace=True, data_dir=data_dir)
        notes.append(f"fail reasons attached to {fr.updated} records; {fr.fail_without_reason} of "
                     f"{fr.fail_records} fail records had none")
    return notes
