"""SPEC section 9: ``postprocess`` re-cleans summaries safely (temp file + rename)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from merger.jsonl_io import atomic_write_lines, read_records
from merger.postprocess import postprocess_file
from stage_a.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HEADER = "<DOMAIN=bbu>, <TASK=BBU接地线检查>"
RAW = HEADER + '\n{"备注": [], "统计": [{"类别": "BBU设备"}]}'
CLEAN = '{"统计": [{"类别": "BBU设备"}], "备注": []}'


def record(i: int, label: str = "pass", summaries: list[str] | None = None) -> dict[str, Any]:
    summaries = summaries or [RAW, "  无关图片，图纸  "]
    return {
        "group_id": f"QC-TEMP-20241206-{i:07d}",
        "mission": "BBU接地线检查",
        "label": label,
        "images": [f"img_{k}.jpg" for k in range(1, len(summaries) + 1)],
        "per_image": {f"image_{k}": s for k, s in enumerate(summaries, 1)},
    }


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(data)
    return data


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_postprocess_in_place(tmp_path: Path) -> None:
    path = tmp_path / "m_stage_a.jsonl"
    write_jsonl(path, [record(1, "fail"), record(2, summaries=["图片模糊"])])
    report = postprocess_file(path, inplace=True)
    assert (report.records, report.summaries_changed) == (2, 2)
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    assert rows[0]["per_image"] == {"image_1": CLEAN, "image_2": "无关图片"}
    assert rows[0]["label"] == "fail" and rows[1]["per_image"] == {"image_1": "图片模糊"}
    assert temp_files(tmp_path) == []
    # Idempotent: a second pass changes nothing, byte for byte.
    before = path.read_bytes()
    assert postprocess_file(path, inplace=True).summaries_changed == 0
    assert path.read_bytes() == before


def test_postprocess_to_output_leaves_input(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    original = write_jsonl(path, [record(1)])
    out = tmp_path / "sub" / "out.jsonl"
    report = postprocess_file(path, output=out)
    assert report.records == 1
    assert path.read_bytes() == original
    assert json.loads(out.read_text("utf-8"))["per_image"]["image_1"] == CLEAN


def test_keeps_gt_fields_and_blank_lines_dropped(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    r = record(1, "fail") | {"gt_fail_reason_texts": ["a"], "gt_fail_reason_text": "a"}
    path.write_text(json.dumps(r, ensure_ascii=False) + "\n\n", "utf-8")
    postprocess_file(path, inplace=True)
    lines = path.read_text("utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["gt_fail_reason_text"] == "a"


def test_preserves_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [record(1)])
    path.chmod(0o640)
    postprocess_file(path, inplace=True)
    assert path.stat().st_mode & 0o777 == 0o640


def test_needs_a_target(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [record(1)])
    with pytest.raises(UserError):
        postprocess_file(path)
    with pytest.raises(UserError):
        postprocess_file(path, output=tmp_path / "o.jsonl", inplace=True)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        postprocess_file(tmp_path / "nope.jsonl", inplace=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"group_id": "x", ', "malformed JSON"),
        ('["not", "an", "object"]', "JSON object"),
        (json.dumps(record(9) | {"label": "ok"}), "label"),
        (json.dumps(record(9) | {"per_image": {"image_1": "a"}}), "per_image"),
    ],
)
def test_bad_line_leaves_file_identical(tmp_path: Path, bad: str, reason: str) -> None:
    path = tmp_path / "m.jsonl"
    good = [json.dumps(record(i)) for i in range(5)]
    original = ("\n".join(good[:3] + [bad] + good[3:]) + "\n").encode()
    path.write_bytes(original)
    with pytest.raises(UserError) as exc:
        postprocess_file(path, inplace=True)
    assert str(exc.value).startswith(f"{path}:4: ") and reason in str(exc.value)
    assert path.read_bytes() == original
    assert temp_files(tmp_path) == []


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    original = (json.dumps(record(1)) + "\n").encode() + b'{"group_id": "\xff"}\n'
    path.write_bytes(original)
    with pytest.raises(UserError, match=":2: not valid UTF-8"):
        postprocess_file(path, inplace=True)
    assert path.read_bytes() == original


def test_summary_empty_after_cleanup_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    original = write_jsonl(path, [record(1), record(2, "fail", ["x", HEADER])])
    with pytest.raises(UserError) as exc:
        postprocess_file(path, inplace=True)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:2: ") and "QC-TEMP-20241206-0000002" in msg and "image_2" in msg
    assert path.read_bytes() == original


def test_atomic_write_removes_temp_on_keyboard_interrupt(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"old\n")

    def lines() -> Iterator[str]:
        yield "a"
        yield "b\n"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_lines(path, lines())
    assert path.read_bytes() == b"old\n"
    assert temp_files(tmp_path) == []
    assert atomic_write_lines(path, iter(["a", "b\n"])) == 2
    assert path.read_bytes() == b"a\nb\n"


def test_read_records_yields_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\ufeff" + json.dumps(record(1)) + "\n\n" + json.dumps(record(2)) + "\n", "utf-8")
    assert [n for n, _ in read_records(path)] == [1, 3]


# The child pauses part-way through (after the temp file has received data) so the SIGKILL
# lands mid-write deterministically, however fast the machine is.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import merger.postprocess as pp

    calls = 0
    real = pp.clean_summary

    def slow_clean(text):
        global calls
        calls += 1
        if calls == int(sys.argv[3]):
            Path(sys.argv[2]).touch()
            time.sleep(120)
        return real(text)

    pp.clean_summary = slow_clean
    out = sys.argv[4] if len(sys.argv) > 4 else None
    pp.postprocess_file(Path(sys.argv[1]), output=Path(out) if out else None, inplace=out is None)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("to_output", [False, True])
def test_sigkill_halfway_leaves_original(tmp_path: Path, to_output: bool) -> None:
    n = 200_000
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "big_stage_a.jsonl"
    line = json.dumps(record(0, summaries=[RAW]), ensure_ascii=False)
    original = "".join(line.replace("0000000", f"{i:07d}") + "\n" for i in range(n)).encode()
    path.write_bytes(original)
    marker = tmp_path / "paused"
    out = data_dir / "out.jsonl"
    args = [sys.executable, "-c", _CHILD, str(path), str(marker), str(n // 10)]
    if to_output:
        args.append(str(out))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "child never reached the pause point"
            time.sleep(0.01)
        temps = temp_files(data_dir)
        assert len(temps) == 1 and temps[0].name.startswith(f".{(out if to_output else path).name}.")
        assert temps[0].stat().st_size > 0  # really mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == original
    assert not out.exists()
    # Only the abandoned temp file may remain; it never sits at the final path.
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.startswith(".")) == [path.name]
