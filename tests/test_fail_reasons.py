"""SPEC section 9: attach reviewers' fail reasons from an .xlsx (BBU only)."""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from openpyxl import Workbook
from support.cli import read_jsonl

from merger.fail_reasons import add_fail_reasons_file, load_fail_reasons
from stage_a.errors import UserError

MISSION = "挡风板安装检查"


def record(gid: str, label: str, mission: str = MISSION) -> dict[str, Any]:
    return {
        "group_id": gid,
        "mission": mission,
        "label": label,
        "images": ["a.jpg"],
        "per_image": {"image_1": "无关图片"},
    }


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(data)
    return data


def write_xlsx(path: Path, rows: list[list[Any]], write_only: bool = False) -> Path:
    wb = Workbook(write_only=write_only)
    ws = wb.create_sheet() if write_only else wb.active
    assert ws is not None
    for row in rows:
        ws.append(row)
    if not write_only:
        wb.create_sheet("ignored").append(["G9", "", MISSION, "", "", "other sheet", 2])
    wb.save(path)
    return path


def row(gid: str, reason: str | None, flag: Any, mission: str = MISSION) -> list[Any]:
    return [gid, "站点", mission, "2024-12-06", "张三", reason, flag]


@pytest.fixture
def sheet(tmp_path: Path) -> Path:
    return write_xlsx(
        tmp_path / "BBU_scene_latest.xlsx",
        [
            row("G1", "挡风板缺失", 2),
            row("G1", "螺丝松动", "2"),
            row("G1", "挡风板缺失", 2.0),  # duplicate reason
            row("G1", "  ", 2),  # blank reason
            row("G1", "通过的备注", 1),  # pass row: never a fail reason
            row("G1", "其他任务原因", 2, mission="BBU接地线检查"),  # same group, other mission
            row("G2", None, 2),  # fail row without reason text
            row("G3", "A原因", 2),
            [None] * 7,  # blank row
            [None, "注释行"],
        ],
    )


def test_load_fail_reasons(sheet: Path) -> None:
    assert load_fail_reasons(sheet) == {
        ("G1", MISSION): ["挡风板缺失", "螺丝松动"],
        ("G1", "BBU接地线检查"): ["其他任务原因"],
        ("G2", MISSION): [],
        ("G3", MISSION): ["A原因"],
    }


def test_attach_reasons_in_place(tmp_path: Path, sheet: Path) -> None:
    path = tmp_path / f"{MISSION}_stage_a.jsonl"
    write_jsonl(
        path,
        [
            record("G1", "fail"),
            record("G2", "fail"),
            record("G4", "fail"),
            record("G1", "pass"),
            record("G3", "pass"),
        ],
    )
    report = add_fail_reasons_file(path, sheet, "bbu", inplace=True)
    assert (report.updated, report.fail_without_reason, report.fail_records) == (1, 2, 3)
    rows = read_jsonl(path)
    assert rows[0]["gt_fail_reason_texts"] == ["挡风板缺失", "螺丝松动"]
    assert rows[0]["gt_fail_reason_text"] == "挡风板缺失 | 螺丝松动"
    assert list(rows[0])[-2:] == ["gt_fail_reason_texts", "gt_fail_reason_text"]
    for r in rows[1:3]:
        assert r["gt_fail_reason_texts"] == [] and r["gt_fail_reason_text"] is None
    # Pass records (including the resubmitted G1 and G3 with a fail row in the sheet) unchanged.
    assert rows[3] == record("G1", "pass") and rows[4] == record("G3", "pass")


def test_keyed_by_mission(tmp_path: Path, sheet: Path) -> None:
    path = tmp_path / "in.jsonl"
    original = write_jsonl(path, [record("G1", "fail", mission="BBU接地线检查")])
    out = tmp_path / "out.jsonl"
    add_fail_reasons_file(path, sheet, "bbu", output=out)
    assert read_jsonl(out)[0]["gt_fail_reason_texts"] == ["其他任务原因"]
    assert path.read_bytes() == original


def test_rerun_replaces_reasons(tmp_path: Path, sheet: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [record("G1", "fail")])
    add_fail_reasons_file(path, sheet, "bbu", inplace=True)
    first = path.read_bytes()
    add_fail_reasons_file(path, sheet, "bbu", inplace=True)
    assert path.read_bytes() == first


@pytest.fixture
def jsonl(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "in.jsonl"
    return path, write_jsonl(path, [record("G1", "fail"), record("G2", "pass")])


def assert_untouched(jsonl: tuple[Path, bytes]) -> None:
    path, original = jsonl
    assert path.read_bytes() == original
    assert sorted(
        p.name for p in path.parent.iterdir() if p.suffix == ".jsonl" or p.name.endswith(".tmp")
    ) == [path.name]


def test_rru_refused(jsonl: tuple[Path, bytes], sheet: Path) -> None:
    with pytest.raises(UserError, match="^add-fail-reasons is supported for BBU only$"):
        add_fail_reasons_file(jsonl[0], sheet, "rru", inplace=True)
    assert_untouched(jsonl)


def test_missing_excel(jsonl: tuple[Path, bytes], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Excel file not found"):
        add_fail_reasons_file(jsonl[0], tmp_path / "nope.xlsx", "bbu", inplace=True)
    assert_untouched(jsonl)


def test_not_an_xlsx(jsonl: tuple[Path, bytes], tmp_path: Path) -> None:
    bad = tmp_path / "bad.xlsx"
    bad.write_text("not a workbook")
    with pytest.raises(UserError, match="not a readable .xlsx"):
        add_fail_reasons_file(jsonl[0], bad, "bbu", inplace=True)
    assert_untouched(jsonl)


def test_too_few_columns(jsonl: tuple[Path, bytes], tmp_path: Path) -> None:
    excel = write_xlsx(tmp_path / "narrow.xlsx", [r[:6] for r in [row("G1", "x", 2), row("G2", "y", 2)]])
    with pytest.raises(UserError, match="6 column.*at least 7"):
        add_fail_reasons_file(jsonl[0], excel, "bbu", inplace=True)
    assert_untouched(jsonl)


@pytest.mark.parametrize(("column", "index"), [("C", 2), ("F", 5)])
def test_empty_column_is_missing(jsonl: tuple[Path, bytes], tmp_path: Path, column: str, index: int) -> None:
    """A mission or reason column with no value in any row is a missing column (SPEC 9), not a
    sheet whose every fail group has no reason: it must not null the records' reasons."""
    rows = [row("G1", "x", 2), row("G2", "y", 1)]
    for r in rows:
        r[index] = None
    excel = write_xlsx(tmp_path / "blank_col.xlsx", rows)
    with pytest.raises(UserError, match=f"column {column} .*empty in every row"):
        add_fail_reasons_file(jsonl[0], excel, "bbu", inplace=True)
    assert_untouched(jsonl)


def test_empty_sheet(jsonl: tuple[Path, bytes], tmp_path: Path) -> None:
    excel = write_xlsx(tmp_path / "empty.xlsx", [])
    with pytest.raises(UserError, match="at least 7"):
        add_fail_reasons_file(jsonl[0], excel, "bbu", inplace=True)
    assert_untouched(jsonl)


@pytest.mark.parametrize("flag", ["不通过", "", None])
def test_non_numeric_flag_names_row(jsonl: tuple[Path, bytes], tmp_path: Path, flag: Any) -> None:
    excel = write_xlsx(tmp_path / "flag.xlsx", [row("G1", "x", 2), row("G2", "y", 1), row("G3", "z", flag)])
    with pytest.raises(UserError, match=r"row 3: pass flag \(column G\)"):
        add_fail_reasons_file(jsonl[0], excel, "bbu", inplace=True)
    assert_untouched(jsonl)


def test_header_row_is_reported(jsonl: tuple[Path, bytes], tmp_path: Path) -> None:
    excel = write_xlsx(tmp_path / "hdr.xlsx", [["group_id", "site", "mission", "d", "who", "reason", "flag"]])
    with pytest.raises(UserError, match="row 1"):
        add_fail_reasons_file(jsonl[0], excel, "bbu", inplace=True)
    assert_untouched(jsonl)


def test_bad_jsonl_line_leaves_file(tmp_path: Path, sheet: Path) -> None:
    path = tmp_path / "in.jsonl"
    original = write_jsonl(path, [record("G1", "fail")]) + b"{oops\n"
    path.write_bytes(original)
    with pytest.raises(UserError, match=":2: malformed JSON"):
        add_fail_reasons_file(path, sheet, "bbu", inplace=True)
    assert path.read_bytes() == original


@pytest.mark.slow
def test_large_sheet_streams(tmp_path: Path) -> None:
    n = 100_000
    # Only the columns that are read (B, D, E left empty) keep the file, and the test, small.
    rows = [[f"G{i}", None, MISSION, None, None, f"原因{i % 7}", 2 if i % 3 == 0 else 1] for i in range(n)]
    excel = write_xlsx(tmp_path / "big.xlsx", rows, write_only=True)
    start = time.monotonic()
    table = load_fail_reasons(excel)
    assert len(table) == len(range(0, n, 3))
    assert table[("G99999", MISSION)] == ["原因4"]
    assert time.monotonic() - start < 120


def test_wrong_stored_dimension_is_ignored(tmp_path: Path) -> None:
    # Some writers store <dimension ref="A1"/>; trusting it would stop reading after row 1.
    good = write_xlsx(tmp_path / "good.xlsx", [row("G1", "x", 2), row("G2", "y", 1), row("G3", "z", 2)])
    bad = tmp_path / "bad_dim.xlsx"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = re.sub(rb'<dimension ref="[^"]*"\s*/>', b'<dimension ref="A1"/>', data)
                assert b'<dimension ref="A1"/>' in data
            dst.writestr(item, data)
    assert load_fail_reasons(bad) == {("G1", MISSION): ["x"], ("G3", MISSION): ["z"]}
