"""``add-fail-reasons`` (SPEC section 9): attach reviewers' fail reasons from an .xlsx to fail records.

Sheet layout (first sheet, no header row): A = group_id, C = mission, F = reason text,
G = pass flag (2 = fail). Reasons are keyed by (group_id, mission) because the same group_id
can be submitted to several missions.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.jsonl_io import atomic_write_lines, read_records, resolve_target
from stage_a.errors import UserError
from stage_a.records import GroupRecord

FAIL_FLAG = 2
MIN_COLUMNS = 7  # A..G
COL_GROUP, COL_MISSION, COL_REASON, COL_FLAG = 0, 2, 5, 6
SUPPORTED_DATASETS = ("bbu",)
_REQUIRED = ((COL_GROUP, "column A (group_id)"), (COL_MISSION, "column C (mission)"),
             (COL_REASON, "column F (reason)"), (COL_FLAG, "column G (pass flag)"))


@dataclass
class FailReasonReport:
    updated: int = 0  # fail records that received at least one reason
    fail_without_reason: int = 0  # fail records with no reason in the sheet (text set to null)
    fail_records: int = 0


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # numeric ids typed into Excel come back as floats
    return str(value).strip()


def _flag(value: Any, excel: Path, row: int) -> float:
    """The pass flag as a number; anything non-numeric is a data error worth stopping for."""
    if isinstance(value, bool):
        number = math.nan
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip()) if value is not None else math.nan
        except ValueError:
            number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{excel}: row {row}: pass flag (column G) must be a number, got {value!r}")
    return number


def _too_narrow(excel: Path, width: int) -> UserError:
    return UserError(
        f"{excel}: first sheet has {width} column(s); need at least {MIN_COLUMNS} "
        "(A=group_id, C=mission, F=reason, G=pass flag)"
    )


def load_fail_reasons(excel: Path) -> dict[tuple[str, str], list[str]]:
    """Map (group_id, mission) -> sorted distinct reasons, from rows whose pass flag is 2."""
    from openpyxl import load_workbook  # deferred: only this command needs openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    excel = Path(excel)
    if not excel.is_file():
        raise UserError(f"Excel file not found: {excel}")
    try:
        wb = load_workbook(excel, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as e:
        raise UserError(f"{excel}: not a readable .xlsx workbook ({e})") from None
    reasons: dict[tuple[str, str], set[str]] = {}
    try:
        if not wb.worksheets:
            raise _too_narrow(excel, 0)
        ws = wb.worksheets[0]
        # The stored <dimension> is sometimes wrong (some writers say "A1"), which would stop
        # reading after row 1; read every row the sheet really has instead.
        declared = ws.max_column
        ws.reset_dimensions()
        width = 0
        seen: set[int] = set()  # columns with a value in some row
        # max_col: every row comes back as exactly A..G; later columns are never parsed into tuples.
        for row_no, cells in enumerate(ws.iter_rows(max_col=MIN_COLUMNS, values_only=True), 1):
            filled = [i for i, v in enumerate(cells) if v is not None and str(v).strip()]
            if not filled:
                continue
            width = max(width, filled[-1] + 1)
            seen.update(filled)
            group_id = _cell_text(cells[COL_GROUP])
            if not group_id:
                continue  # nothing to attach it to (e.g. a notes row)
            if cells[COL_FLAG] is None and width < MIN_COLUMNS and (declared or 0) < MIN_COLUMNS:
                raise _too_narrow(excel, width)  # column G absent, not merely one empty cell
            if _flag(cells[COL_FLAG], excel, row_no) != FAIL_FLAG:
                continue
            key = (group_id, _cell_text(cells[COL_MISSION]))
            bucket = reasons.setdefault(key, set())
            reason = _cell_text(cells[COL_REASON])
            if reason:
                bucket.add(reason)
        if width < MIN_COLUMNS:
            raise _too_narrow(excel, width)
        # A column empty in every row is missing (say, a sheet exported without it): every
        # lookup would miss and each fail record's reasons would silently become null.
        empty = [name for col, name in _REQUIRED if col not in seen]
        if empty:
            raise UserError(f"{excel}: first sheet has no {' and no '.join(empty)}: "
                            f"{'that column is' if len(empty) == 1 else 'those columns are'} empty in every row")
    finally:
        wb.close()  # read-only workbooks keep the zip open until closed
    return {key: sorted(texts) for key, texts in reasons.items()}


def _require_supported_mission(mission: str, path: Path, line_no: int, data_dir: str) -> None:
    """A record of a known RRU mission is refused whatever --dataset says (the default is bbu)."""
    from stage_a.missions import get_mission, list_missions

    if mission in list_missions(data_dir=data_dir):
        dataset = get_mission(mission, data_dir=data_dir).dataset
        if dataset not in SUPPORTED_DATASETS:
            raise UserError(
                f"{path}:{line_no}: mission {mission} is {dataset.upper()}; "
                "add-fail-reasons is supported for BBU only"
            )


def add_fail_reasons_file(
    path: Path, excel: Path, dataset: str, output: Path | None = None, inplace: bool = False, data_dir: str = ""
) -> FailReasonReport:
    """Attach ``gt_fail_reason_texts``/``gt_fail_reason_text`` to every fail record of ``path``.

    Everything that can fail (dataset, Excel, target choice, every JSONL line) is checked before
    the atomic rename, so an error leaves the JSONL byte-identical.
    """
    if dataset not in SUPPORTED_DATASETS:
        raise UserError(
            "add-fail-reasons is supported for BBU only"
            if dataset == "rru"
            else f"unknown dataset {dataset!r}; add-fail-reasons is supported for BBU only"
        )
    path = Path(path)
    target = resolve_target(path, output, inplace)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    table = load_fail_reasons(excel)
    report = FailReasonReport()

    def updated_lines() -> Iterator[str]:
        for line_no, d in read_records(path):
            rec = GroupRecord.from_dict(d)
            _require_supported_mission(rec.mission, path, line_no, data_dir)
            if rec.label == "fail":
                rec.set_fail_reasons(table.get((rec.group_id, rec.mission), []))
                report.fail_records += 1
                if rec.gt_fail_reason_texts:
                    report.updated += 1
                else:
                    report.fail_without_reason += 1
            yield rec.to_json_line()

    atomic_write_lines(target, updated_lines())
    return report
