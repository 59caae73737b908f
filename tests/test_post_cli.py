"""SPEC section 9 at the command line: `stage-a postprocess`, `stage-a add-fail-reasons`, and the
same steps as options of `stage-a run` / `stage-a export`, as a user runs them (real subprocesses).

The library behaviour (clean-up rules, sheet parsing, kill-halfway safety) is tested in
test_postprocess.py and test_fail_reasons.py; here: exit codes, one-line errors, files touched.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import support.cli as support_cli
from openpyxl import Workbook
from support.cli import base_env, read_jsonl

from producer.sample_data import make_sample_tree

MISSION = "挡风板安装检查"  # a BBU mission
JSONL = f"{MISSION}_stage_a.jsonl"
HEADER = f"<DOMAIN=bbu>, <TASK={MISSION}>"
DIRTY = HEADER + '\n{"备注": ["无"], "统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}]}'
CLEAN = '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["无"]}'


def cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return support_cli.cli(list(args), base_env(), cwd or Path.cwd(), timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("stage-a: error: ")
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def record(gid: str, label: str, summaries: list[str], mission: str = MISSION) -> dict[str, Any]:
    return {"group_id": gid, "mission": mission, "label": label,
            "images": [f"{gid}-{i}.jpg" for i in range(1, len(summaries) + 1)],
            "per_image": {f"image_{i}": s for i, s in enumerate(summaries, 1)}}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(data)
    return data


def write_xlsx(path: Path, rows: list[list[Any]]) -> Path:
    wb = Workbook()
    ws = wb.active
    assert ws is not None
    for r in rows:
        ws.append(r)
    wb.save(path)
    return path


def xrow(gid: str, reason: str | None, flag: Any, mission: str = MISSION) -> list[Any]:
    """A=group_id, B=site, C=mission, D=date, E=reviewer, F=reason, G=pass flag (2 = fail)."""
    return [gid, "某站点", mission, "2024-12-06", "张三", reason, flag]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ stage-a postprocess


@pytest.fixture()
def dirty(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / JSONL
    data = write_jsonl(path, [
        record("QC-A-00000001-1", "fail", [DIRTY, "  无关图片，这是图纸  "]),
        record("QC-A-00000002-1", "pass", [CLEAN]),
    ])
    return path, data


def test_postprocess_inplace(dirty: tuple[Path, bytes]) -> None:
    path, _ = dirty
    proc = cli("postprocess", str(path), "--inplace", "--dataset", "bbu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"postprocess: 2 records, 2 summaries changed -> {path}"
    records = read_jsonl(path)
    assert records[0]["per_image"] == {"image_1": CLEAN, "image_2": "无关图片"}
    assert records[1]["per_image"] == {"image_1": CLEAN}
    assert leftovers(path.parent) == []
    # Idempotent: a second pass changes nothing.
    before = path.read_bytes()
    proc = cli("postprocess", str(path), "--inplace")
    assert "0 summaries changed" in proc.stdout and path.read_bytes() == before


def test_postprocess_output_leaves_input(dirty: tuple[Path, bytes], tmp_path: Path) -> None:
    path, original = dirty
    out = tmp_path / "sub" / "clean.jsonl"
    proc = cli("postprocess", str(path), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"-> {out}")
    assert path.read_bytes() == original
    assert read_jsonl(out)[0]["per_image"]["image_1"] == CLEAN


def test_postprocess_needs_exactly_one_target(dirty: tuple[Path, bytes], tmp_path: Path) -> None:
    path, original = dirty
    one_line_error(cli("postprocess", str(path)), "--output", "--inplace")
    one_line_error(cli("postprocess", str(path), "--inplace", "--output", str(tmp_path / "o.jsonl")), "not both")
    assert path.read_bytes() == original
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(("bad_line", "reason"), [
    ("{oops", "malformed JSON"),
    (json.dumps(record("QC-A-3", "maybe", ["x"])), "label"),
    (json.dumps({**record("QC-A-3", "pass", ["x", "y"]), "per_image": {"image_1": "x"}}), "image_2"),
])
@pytest.mark.parametrize("inplace", [True, False])
def test_postprocess_bad_line_names_it_and_leaves_file(dirty: tuple[Path, bytes], tmp_path: Path, bad_line: str,
                                                       reason: str, inplace: bool) -> None:
    path, original = dirty
    lines = original.decode().splitlines(keepends=True)
    data = (lines[0] + "\n" + bad_line + "\n" + lines[1]).encode()  # blank line 2; the bad one is line 3
    path.write_bytes(data)
    out = tmp_path / "out.jsonl"
    proc = cli("postprocess", str(path), *(["--inplace"] if inplace else ["--output", str(out)]))
    one_line_error(proc, f"{path}:3:", reason)
    assert path.read_bytes() == data
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_postprocess_missing_file(tmp_path: Path) -> None:
    one_line_error(cli("postprocess", str(tmp_path / "nope.jsonl"), "--inplace"), "nope.jsonl", "no such file")


# ------------------------------------------------------------------------- stage-a add-fail-reasons


@pytest.fixture()
def jsonl(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / JSONL
    data = write_jsonl(path, [
        record("G1", "fail", [CLEAN]),
        record("G2", "fail", [CLEAN]),
        record("G1", "pass", [CLEAN]),  # resubmission: same group id, pass label
    ])
    return path, data


@pytest.fixture()
def sheet(tmp_path: Path) -> Path:
    return write_xlsx(tmp_path / "BBU_scene_latest.xlsx", [
        xrow("G1", "挡风板缺失", 2),
        xrow("G1", "螺丝松动", 2),
        xrow("G1", "挡风板缺失", 2),
        xrow("G1", "不是失败", 1),
        xrow("G1", "其他任务", 2, mission="BBU接地线检查"),
        xrow("G2", "通过", 1),
    ])


def test_add_fail_reasons_inplace(jsonl: tuple[Path, bytes], sheet: Path) -> None:
    path, _ = jsonl
    proc = cli("add-fail-reasons", str(path), "--excel", str(sheet), "--inplace")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "add-fail-reasons: 1 records updated; 1 of 2 fail records had no reason"
    g1_fail, g2_fail, g1_pass = read_jsonl(path)
    assert g1_fail["gt_fail_reason_texts"] == ["挡风板缺失", "螺丝松动"]
    assert g1_fail["gt_fail_reason_text"] == "挡风板缺失 | 螺丝松动"
    assert g2_fail["gt_fail_reason_texts"] == [] and g2_fail["gt_fail_reason_text"] is None
    assert "gt_fail_reason_texts" not in g1_pass and "gt_fail_reason_text" not in g1_pass
    assert leftovers(path.parent) == []


def test_add_fail_reasons_output(jsonl: tuple[Path, bytes], sheet: Path, tmp_path: Path) -> None:
    path, original = jsonl
    out = tmp_path / "with_reasons.jsonl"
    proc = cli("add-fail-reasons", str(path), "--excel", str(sheet), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes() == original
    assert read_jsonl(out)[0]["gt_fail_reason_text"] == "挡风板缺失 | 螺丝松动"


def test_add_fail_reasons_needs_excel_option(jsonl: tuple[Path, bytes]) -> None:
    path, original = jsonl
    proc = cli("add-fail-reasons", str(path), "--inplace")
    assert proc.returncode == 2 and "--excel" in proc.stderr and "Traceback" not in proc.stderr
    assert path.read_bytes() == original


def test_add_fail_reasons_needs_a_target(jsonl: tuple[Path, bytes], sheet: Path) -> None:
    path, original = jsonl
    one_line_error(cli("add-fail-reasons", str(path), "--excel", str(sheet)), "--output", "--inplace")
    assert path.read_bytes() == original


def sheets(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    bad_zip = tmp_path / "bad.xlsx"
    bad_zip.write_text("not a workbook")
    return {
        "missing": (tmp_path / "absent.xlsx", ["Excel file not found", "absent.xlsx"]),
        "not-xlsx": (bad_zip, ["not a readable .xlsx"]),
        "too-few-columns": (write_xlsx(tmp_path / "narrow.xlsx", [xrow("G1", "x", 2)[:6]]),
                            ["6 column", "at least 7"]),
        "non-numeric-flag": (write_xlsx(tmp_path / "flag.xlsx", [xrow("G1", "x", 2), xrow("G2", "y", "不通过")]),
                             ["row 2", "pass flag (column G)", "不通过"]),
        "header-row": (write_xlsx(tmp_path / "hdr.xlsx", [["group_id", "site", "mission", "d", "who", "reason",
                                                            "flag"], xrow("G1", "x", 2)]), ["row 1"]),
    }


@pytest.mark.parametrize("case", ["missing", "not-xlsx", "too-few-columns", "non-numeric-flag", "header-row"])
def test_add_fail_reasons_bad_sheet_leaves_jsonl(jsonl: tuple[Path, bytes], tmp_path: Path, case: str) -> None:
    path, original = jsonl
    excel, words = sheets(tmp_path)[case]
    one_line_error(cli("add-fail-reasons", str(path), "--excel", str(excel), "--inplace"), *words)
    assert path.read_bytes() == original
    assert leftovers(tmp_path) == []


def test_add_fail_reasons_rru_refused(jsonl: tuple[Path, bytes], sheet: Path, tmp_path: Path) -> None:
    path, original = jsonl
    one_line_error(cli("add-fail-reasons", str(path), "--excel", str(sheet), "--dataset", "rru", "--inplace"),
                   "BBU only")
    assert path.read_bytes() == original
    # An RRU file is refused even without --dataset (whose default is bbu): the records say RRU.
    rru = tmp_path / "RRU安装检查_stage_a.jsonl"
    rru_data = write_jsonl(rru, [record("G1", "fail", [CLEAN], mission="RRU安装检查")])
    write_xlsx(sheet, [xrow("G1", "尾纤无护套", 2, mission="RRU安装检查")])
    one_line_error(cli("add-fail-reasons", str(rru), "--excel", str(sheet), "--inplace"), "RRU", "BBU only")
    assert rru.read_bytes() == rru_data
    assert leftovers(tmp_path) == []


# ------------------------------------------------- the same steps as options of `run` and `export`


@pytest.fixture(scope="module")
def job(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `stage-a run` on the tiny model with --postprocess --add-gt-fail-reason --excel-path."""
    tmp = tmp_path_factory.mktemp("post_cli_run")
    tree = make_sample_tree(tmp / "input", MISSION, n_fail=2, n_pass=1, seed=3)
    fail_ids = sorted(p.name for p in (tree / MISSION / "审核不通过").iterdir())
    assert len(fail_ids) == 2
    excel = write_xlsx(tmp / "BBU_scene_latest.xlsx", [
        xrow(fail_ids[0], "挡风板缺失", 2),
        xrow(fail_ids[0], "螺丝松动", 2),
        xrow(fail_ids[0], "其他任务", 2, mission="BBU接地线检查"),
        xrow(fail_ids[1], "通过", 1),
    ])
    out = tmp / "out"
    proc = cli("run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(out),
               "--checkpoint", str(tiny_checkpoint), "--gpus", "cpu", "--device", "cpu", "--max-new-tokens", "4",
               "--max-pixels", "50176", "--batch-size", "4", "--postprocess", "--add-gt-fail-reason",
               "--excel-path", str(excel), cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "out": out, "db": out / "stage_a_results.db", "excel": excel, "fail_ids": fail_ids,
            "proc": proc}


@pytest.mark.slow
def test_run_applies_postprocess_and_fail_reasons(job: dict[str, Any]) -> None:
    assert "postprocess: 3 records" in job["proc"].stderr
    assert "fail reasons attached to 1 records; 1 of 2 fail records had none" in job["proc"].stderr
    records = read_jsonl(job["out"] / JSONL)
    assert [r["label"] for r in records] == ["fail", "fail", "pass"]
    by_gid = {r["group_id"]: r for r in records if r["label"] == "fail"}
    first, second = job["fail_ids"]
    assert by_gid[first]["gt_fail_reason_texts"] == ["挡风板缺失", "螺丝松动"]
    assert by_gid[first]["gt_fail_reason_text"] == "挡风板缺失 | 螺丝松动"
    assert by_gid[second]["gt_fail_reason_texts"] == [] and by_gid[second]["gt_fail_reason_text"] is None
    assert "gt_fail_reason_texts" not in records[2]


@pytest.mark.slow
def test_export_flags_give_the_run_output(job: dict[str, Any], tmp_path: Path) -> None:
    plain, flagged = tmp_path / "plain", tmp_path / "flagged"
    proc = cli("export", "--mission", MISSION, "--db", str(job["db"]), "--output-dir", str(plain))
    assert proc.returncode == 0, proc.stderr
    assert all("gt_fail_reason_texts" not in r for r in read_jsonl(plain / JSONL))
    proc = cli("export", "1", "--db", str(job["db"]), "--output-dir", str(flagged), "--postprocess",
               "--add-gt-fail-reason", "--excel-path", str(job["excel"]))
    assert proc.returncode == 0, proc.stderr
    assert "fail reasons attached to 1 records; 1 of 2 fail records had none" in proc.stderr
    assert (flagged / JSONL).read_bytes() == (job["out"] / JSONL).read_bytes()
    assert leftovers(flagged) == []


@pytest.mark.slow
def test_export_postprocess_recleans_stored_summaries(job: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(job["db"], db)
    with sqlite3.connect(db) as con:  # a summary stored before a clean-up fix, say
        first = con.execute("SELECT group_position, image_index FROM images "
                            "ORDER BY group_position, image_index LIMIT 1").fetchone()
        changed = con.execute("UPDATE images SET summary = ? WHERE group_position = ? AND image_index = ?",
                              (DIRTY, *first)).rowcount
    assert changed == 1
    raw, post = tmp_path / "raw", tmp_path / "post"
    assert cli("export", "1", "--db", str(db), "--output-dir", str(raw)).returncode == 0
    assert read_jsonl(raw / JSONL)[0]["per_image"]["image_1"] == DIRTY
    proc = cli("export", "1", "--db", str(db), "--output-dir", str(post), "--postprocess")
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(post / JSONL)
    assert records[0]["per_image"]["image_1"] == CLEAN
    assert records[1:] == read_jsonl(raw / JSONL)[1:]


@pytest.mark.slow
def test_export_with_missing_excel(job: dict[str, Any], tmp_path: Path) -> None:
    plain, flagged = tmp_path / "plain", tmp_path / "flagged"
    assert cli("export", "1", "--db", str(job["db"]), "--output-dir", str(plain)).returncode == 0
    proc = cli("export", "1", "--db", str(job["db"]), "--output-dir", str(flagged), "--add-gt-fail-reason",
               "--excel-path", str(tmp_path / "absent.xlsx"))
    one_line_error(proc, "Excel file not found")
    # The export itself happened; the reasons step left its JSONL as exported.
    assert (flagged / JSONL).read_bytes() == (plain / JSONL).read_bytes()
    assert leftovers(flagged) == []
