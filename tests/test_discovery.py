from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.discovery import image_names

from producer.discovery import Discovery, Group, discover
from stage_a.errors import UserError

MISSION = "挡风板安装检查"
PASS, FAIL = "审核通过", "审核不通过"


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def make_group(root: Path, label_dir: str, gid: str, names: list[str], mission: str = MISSION) -> None:
    for n in names:
        touch(root / mission / label_dir / gid / n)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    # Resubmission: QC-A exists under both labels.
    make_group(root, PASS, "QC-A", ["a_10.jpg", "a_2.JPG", "a_1.Png", "notes.txt", "meta.json"])
    make_group(root, FAIL, "QC-A", ["f_1.jpeg"])
    make_group(root, PASS, "QC-B", ["b_1.jpg"])
    make_group(root, FAIL, "QC-0", ["z.png"])
    make_group(root, FAIL, "QC-EMPTY", ["readme.txt"])
    (root / MISSION / "其他").mkdir()
    touch(root / MISSION / "stray.jpg")
    return root


def keys(d: Discovery) -> list[tuple[str, str]]:
    return [(g.group_id, g.label) for g in d.groups]


def test_groups_labels_order_and_resubmissions(tree: Path) -> None:
    d = discover(tree, MISSION)
    assert d.mission == MISSION
    assert d.input_root == tree.resolve()
    # fail first (by name), then pass (by name); QC-A appears once per label.
    assert keys(d) == [("QC-0", "fail"), ("QC-A", "fail"), ("QC-A", "pass"), ("QC-B", "pass")]


def test_images_natural_sorted_case_insensitive_and_relative(tree: Path) -> None:
    d = discover(tree, MISSION)
    g = next(g for g in d.groups if (g.group_id, g.label) == ("QC-A", "pass"))
    assert image_names(g) == ["a_1.Png", "a_2.JPG", "a_10.jpg"]
    assert g.images == tuple(f"{MISSION}/{PASS}/QC-A/{n}" for n in image_names(g))
    for p in g.images:  # relative to input_root, posix style, and they exist
        assert not p.startswith("/") and "\\" not in p
        assert (d.input_root / p).is_file()
    assert d.groups[1].images == (f"{MISSION}/{FAIL}/QC-A/f_1.jpeg",)


def test_natural_sort_many(tmp_path: Path) -> None:
    names = [f"x_{i}.jpg" for i in (10, 2, 1, 100, 21, 3)]
    make_group(tmp_path, PASS, "G", names)
    (g,) = discover(tmp_path, MISSION).groups
    assert image_names(g) == ["x_1.jpg", "x_2.jpg", "x_3.jpg", "x_10.jpg", "x_21.jpg", "x_100.jpg"]


def test_group_folders_sorted_by_name(tmp_path: Path) -> None:
    for gid in ["QC-C", "QC-A", "QC-B"]:
        make_group(tmp_path, FAIL, gid, ["1.jpg"])
        make_group(tmp_path, PASS, gid + "p", ["1.jpg"])
    d = discover(tmp_path, MISSION)
    assert [g.group_id for g in d.groups] == ["QC-A", "QC-B", "QC-C", "QC-Ap", "QC-Bp", "QC-Cp"]
    assert [g.label for g in d.groups] == ["fail"] * 3 + ["pass"] * 3


def test_warnings_name_skipped_things(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="producer.discovery"):
        d = discover(tree, MISSION)
    assert any("其他" in w for w in d.warnings)  # unknown label folder named
    assert any("stray.jpg" in w for w in d.warnings)  # stray file under the mission named
    assert any("QC-EMPTY" in w for w in d.warnings)  # empty group named
    assert "QC-EMPTY" not in [g.group_id for g in d.groups]
    # non-image files are ignored silently
    assert not any("notes.txt" in w or "meta.json" in w for w in d.warnings)
    logged = caplog.text
    assert "其他" in logged and "QC-EMPTY" in logged


def test_hidden_and_non_file_entries_ignored(tmp_path: Path) -> None:
    make_group(tmp_path, PASS, "G", ["._a_1.jpg", "a_1.jpg"])
    (tmp_path / MISSION / PASS / "G" / "sub.jpg").mkdir()
    (g,) = discover(tmp_path, MISSION).groups
    assert image_names(g) == ["a_1.jpg"]


def test_input_root_is_mission_folder(tree: Path) -> None:
    d = discover(tree / MISSION, MISSION)
    assert d.input_root == tree.resolve()
    assert keys(d) == keys(discover(tree, MISSION))
    assert any("mission folder" in w and str(tree.resolve()) in w for w in d.warnings)


def test_input_root_with_label_dirs_but_other_name(tmp_path: Path) -> None:
    make_group(tmp_path, PASS, "G", ["1.jpg"], mission="renamed")
    with pytest.raises(UserError, match="renamed"):
        discover(tmp_path / "renamed", MISSION)


def test_missing_input_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="does not exist") as ei:
        discover(missing, MISSION)
    assert str(missing) in str(ei.value)


def test_input_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        discover(f, MISSION)


def test_missing_mission_lists_existing(tmp_path: Path) -> None:
    make_group(tmp_path, PASS, "G", ["1.jpg"], mission="BBU接地线检查")
    make_group(tmp_path, PASS, "G", ["1.jpg"], mission="RRU线缆")
    with pytest.raises(UserError) as ei:
        discover(tmp_path, MISSION)
    msg = str(ei.value)
    assert MISSION in msg and "BBU接地线检查" in msg and "RRU线缆" in msg and str(tmp_path) in msg
    assert "\n" not in msg


def test_no_groups_is_an_error(tmp_path: Path) -> None:
    make_group(tmp_path, PASS, "G", ["only.txt"])
    with pytest.raises(UserError, match="no image groups"):
        discover(tmp_path, MISSION)


def test_image_names() -> None:
    g = Group("G", "pass", ("m/审核通过/G/a.jpg", "m/审核通过/G/b.png"))
    assert image_names(g) == ["a.jpg", "b.png"]


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A RAM-backed temp dir where there is one: creating 100k files on a busy disk can take a minute."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="stage-a-discovery-", dir=shm)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_100k_files(fast_tmp: Path) -> None:
    n_groups, per_group = 2000, 50
    tmp_path = fast_tmp
    base = tmp_path / MISSION / PASS
    for gi in range(n_groups):
        gdir = os.path.join(base, f"QC-{gi:05d}")
        os.makedirs(gdir)
        for i in range(per_group):
            os.close(os.open(os.path.join(gdir, f"x_{i}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
    d = discover(tmp_path, MISSION)
    assert len(d.groups) == n_groups
    assert sum(len(g.images) for g in d.groups) == n_groups * per_group
    assert image_names(d.groups[0])[:3] == ["x_0.jpg", "x_1.jpg", "x_2.jpg"]
    assert image_names(d.groups[0])[-1] == "x_49.jpg"
