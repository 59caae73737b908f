"""`stage-a run` end to end, as a user runs it: a real subprocess on the real tiny Qwen3-VL."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.cli import base_env, cli, read_jsonl
from support.runreport import check_report

pytestmark = pytest.mark.slow

MISSION = "挡风板安装检查"
PASS, FAIL = "审核通过", "审核不通过"
JSONL = f"{MISSION}_stage_a.jsonl"
FAILURES = f"{MISSION}_stage_a_failures.jsonl"
REPORT = f"{MISSION}_stage_a_report.json"


def _image_bytes(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _put(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


_seed = iter(range(10_000))


def _img(folder: Path, name: str, size: tuple[int, int] = (96, 64)) -> None:
    fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
    _put(folder, name, _image_bytes(next(_seed), size, fmt))


# What the tree below must produce: (group_id, label, image names in natural order), in output order.
EXPECTED = [
    ("QC-TEST-20240101-0000001", "fail", ["a.jpeg", "b.PNG"]),
    ("QC-TEST-20240101-0000002", "fail", ["x_1.png", "x_2.JPG", "x_10.jpg"]),
    ("QC-TEST-20240101-0000000", "pass", ["z.JPEG"]),
    ("QC-TEST-20240101-0000002", "pass", ["p_1.jpg", "p_3.jpg"]),
    ("QC-TEST-20240101-0000005", "pass", ["img_2.jpg", "img_11.jpg"]),
]
BROKEN = {
    ("QC-TEST-20240101-0000003", "pass"): ["good.jpg", "truncated.jpg"],
    ("QC-TEST-20240101-0000004", "pass"): ["garbage.jpg"],
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "input"
    m = root / MISSION
    # Fail groups, created out of name order.
    g = m / FAIL / "QC-TEST-20240101-0000002"
    _img(g, "x_10.jpg", (200, 120))
    _img(g, "x_2.JPG", (64, 160))
    _img(g, "x_1.png", (128, 128))
    _put(g, "notes.txt", b"not an image")
    _put(g, "x_3.jpg.bak", b"stray")
    g = m / FAIL / "QC-TEST-20240101-0000001"
    _img(g, "b.PNG", (160, 96))
    _img(g, "a.jpeg", (72, 72))
    _put(g, "Thumbs.db", b"\x00\x01")
    # Empty group: only non-images.
    _put(m / FAIL / "QC-TEST-20240101-0000009", "readme.txt", b"nothing here")
    # Pass groups; 0000002 is a resubmission of the fail group of the same id.
    g = m / PASS / "QC-TEST-20240101-0000002"
    _img(g, "p_3.jpg", (100, 180))
    _img(g, "p_1.jpg", (180, 100))
    _img(m / PASS / "QC-TEST-20240101-0000000", "z.JPEG", (240, 200))
    g = m / PASS / "QC-TEST-20240101-0000005"
    _img(g, "img_11.jpg", (50, 50))
    _img(g, "img_2.jpg", (300, 96))
    # Unreadable images: a truncated JPEG beside a good one, and garbage bytes named .jpg.
    g = m / PASS / "QC-TEST-20240101-0000003"
    _img(g, "good.jpg", (120, 90))
    full = _image_bytes(999, (200, 200), "JPEG")
    _put(g, "truncated.jpg", full[: len(full) // 2])
    _put(m / PASS / "QC-TEST-20240101-0000004", "garbage.jpg", os.urandom(2048))
    # A folder that is neither label: skipped with a warning.
    _img(m / "其他" / "QC-TEST-20240101-0000007", "o.jpg")
    return root


def run_cli(args: list[str], cache: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return cli(args, base_env(STAGE_A_CACHE_DIR=str(cache)), cwd, timeout)


def stage_a_run(tree: Path, out: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(out),
                    "--checkpoint", str(checkpoint), "--device", "cpu", "--max-new-tokens", "12", *extra],
                   cache=out.parent / "cache", cwd=out.parent)


@pytest.fixture(scope="module")
def main_run(tree: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("run_main") / "out"
    proc = stage_a_run(tree, out, tiny_checkpoint, "--batch-size", "8")
    return out, proc


def test_output_lines_order_and_shape(main_run) -> None:  # type: ignore[no-untyped-def]
    out, proc = main_run
    assert "Traceback" not in proc.stderr, proc.stderr
    records = read_jsonl(out / JSONL)
    got = [(r["group_id"], r["label"], r["images"]) for r in records]
    assert got == EXPECTED
    for r in records:
        assert list(r) == ["group_id", "mission", "label", "images", "per_image"]
        assert r["mission"] == MISSION
        assert list(r["per_image"]) == [f"image_{i}" for i in range(1, len(r["images"]) + 1)]
        assert all(isinstance(v, str) and v for v in r["per_image"].values())
    raw = (out / JSONL).read_text(encoding="utf-8")
    assert f'"mission": "{MISSION}"' in raw  # ensure_ascii=False: Chinese stays readable
    assert raw.endswith("\n")


def test_warnings_for_unknown_folder_and_empty_group(main_run) -> None:  # type: ignore[no-untyped-def]
    _, proc = main_run
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert any("其他" in ln for ln in warnings), proc.stderr
    assert any("QC-TEST-20240101-0000009" in ln for ln in warnings), proc.stderr
    # Stray non-image files inside groups are ignored silently, not reported as groups or errors.
    assert "notes.txt" not in proc.stderr and "Thumbs.db" not in proc.stderr
    assert "7 groups (7 found), 13 images" in proc.stderr


def test_unreadable_images_go_to_the_failure_report(main_run) -> None:  # type: ignore[no-untyped-def]
    out, proc = main_run
    assert proc.returncode == 3, proc.stderr
    assert "5 groups written, 2 groups failed" in proc.stdout
    failures = read_jsonl(out / FAILURES)
    assert {(f["group_id"], f["label"]) for f in failures} == set(BROKEN)
    by_key = {(f["group_id"], f["label"]): f for f in failures}
    trunc = by_key[("QC-TEST-20240101-0000003", "pass")]
    assert [(i["image"], i["file"]) for i in trunc["images"]] == [("image_2", "truncated.jpg")]
    assert trunc["images"][0]["reason"]
    garbage = by_key[("QC-TEST-20240101-0000004", "pass")]
    assert [(i["image"], i["file"]) for i in garbage["images"]] == [("image_1", "garbage.jpg")]
    assert "not an image" in garbage["images"][0]["reason"]
    written = {(r["group_id"], r["label"]) for r in read_jsonl(out / JSONL)}
    assert not written & set(BROKEN)
    # Nothing half-written is left next to the results.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("stage_a_results.db")) == sorted(
        [JSONL, FAILURES, REPORT])


def test_end_of_run_report_beside_the_jsonl(main_run) -> None:  # type: ignore[no-untyped-def]
    """`stage-a run` writes <mission>_stage_a_report.json; every figure agrees with the store's rows."""
    out, proc = main_run
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    assert f"report:   {out / REPORT}" in proc.stdout
    assert report["state"] == "finished" and report["mission"] == MISSION
    assert report["done"] + report["failed"] == 13 and report["failed"] >= 2
    assert len(report["workers"]) == 1 and report["workers"][0]["share"] == 1.0 and report["stragglers"] == []
    check_report(report, str(out / "stage_a_results.db"), report["run_id"])


@pytest.mark.parametrize("extra", [
    ["--sharding-mode", "per_image", "--batch-size", "3"],
    ["--sharding-mode", "per_group", "--batch-size", "1"],
], ids=["per_image-3", "per_group-1"])
def test_sharding_and_batch_size_give_identical_jsonl(main_run, tree: Path, tiny_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path, extra: list[str]) -> None:
    ref_out, _ = main_run
    out = tmp_path / "out"
    proc = stage_a_run(tree, out, tiny_checkpoint, *extra)
    assert proc.returncode == 3, proc.stderr
    assert (out / JSONL).read_bytes() == (ref_out / JSONL).read_bytes()
    assert (out / FAILURES).read_bytes() == (ref_out / FAILURES).read_bytes()


def test_sampling_caps_and_resume(tree: Path, tiny_checkpoint: Path, tmp_path: Path, main_run) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    proc = stage_a_run(tree, out, tiny_checkpoint, "--pass-group-number", "0", "--fail-group-number", "1")
    assert proc.returncode == 0, proc.stderr
    assert "1 groups (7 found)" in proc.stderr
    records = read_jsonl(out / JSONL)
    assert len(records) == 1 and records[0]["label"] == "fail"
    assert (records[0]["group_id"], "fail", records[0]["images"]) in EXPECTED
    # Same summaries as the full run: sampling does not change what a group's images produce.
    ref = {(r["group_id"], r["label"]): r for r in read_jsonl(main_run[0] / JSONL)}
    assert records[0] == ref[(records[0]["group_id"], "fail")]
    assert (out / FAILURES).read_text() == ""
    before = (out / JSONL).read_bytes()

    resumed = run_cli(["run", "--resume", "--db", str(out / "stage_a_results.db"), "--output-dir", str(out)],
                      cache=tmp_path / "cache", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "0 unfinished images" in resumed.stderr
    assert " 0 images in " in resumed.stdout
    assert (out / JSONL).read_bytes() == before


def test_embedded_default_runs_without_checkpoint_or_input(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    proc = run_cli(["run", "--output-dir", str(out), "--max-new-tokens", "8", "--batch-size", "8"],
                   cache=tmp_path / "cache", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM-WEIGHT" in proc.stderr and "meaningless" in proc.stderr
    records = read_jsonl(out / JSONL)
    assert records and all(r["mission"] == MISSION for r in records)
    labels = [r["label"] for r in records]
    assert labels == sorted(labels)  # fail before pass
    assert {"fail", "pass"} == set(labels)
    assert (tmp_path / "cache" / "sample-input" / MISSION).is_dir()
    assert any((tmp_path / "cache" / "models").iterdir())
