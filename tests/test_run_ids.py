"""Run ids are checked: 0, negative and out-of-range ids are one-line errors, never "the latest run"."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import MISSION, free_port
from test_cli_errors import assert_one_line_error

from stage_a.config import RunSpec


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    """A results database holding two recorded runs (run 2 is the latest)."""
    from stage_a.store import GroupInput, ResultStore

    path = tmp_path / "results.db"
    store = ResultStore(f"sqlite:///{path}")
    for _ in range(2):
        store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"),
                         [GroupInput("QC-ID-20240101-0000001", "pass", ("a/b.jpg",))])
    store.close()
    return path


BAD_IDS = ["0", "-1", "2147483648", "99999999999999999999"]


@pytest.mark.parametrize("run_id", BAD_IDS)
def test_export_refuses_bad_run_ids(db: Path, tmp_path: Path, run_id: str) -> None:
    out = tmp_path / "out"
    for args in (["export", f"--run={run_id}"], ["export", "--mission", MISSION, f"--run={run_id}"]):
        line = assert_one_line_error(cli([*args, "--db", str(db), "--output-dir", str(out)], base_env(), tmp_path),
                                     "run id")
        assert run_id in line
    if run_id == "0":  # the positional form too
        assert_one_line_error(cli(["export", "0", "--db", str(db), "--output-dir", str(out)], base_env(), tmp_path),
                              "run id")
    assert not out.exists()


@pytest.mark.parametrize("run_id", BAD_IDS)
def test_resume_refuses_bad_run_ids(db: Path, tmp_path: Path, run_id: str) -> None:
    out = tmp_path / "out"
    proc = cli(["run", "--resume", f"--run={run_id}", "--db", str(db), "--output-dir", str(out)], base_env(),
               tmp_path)
    assert run_id in assert_one_line_error(proc, "run id")
    assert not out.exists()


def test_status_and_enqueue_refuse_run_0(db: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli(["status", "0", "--db", str(db)], base_env(), tmp_path), "run id")
    # Checked before the broker is even contacted (nothing listens on this port).
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    assert_one_line_error(cli(["enqueue", "--run", "0", "--db", str(db), "--broker", dead_broker], base_env(),
                              tmp_path), "run id")


def test_export_with_two_different_ids_is_refused(db: Path, tmp_path: Path) -> None:
    proc = cli(["export", "1", "--run", "2", "--db", str(db), "--output-dir", str(tmp_path / "out")], base_env(),
               tmp_path)
    assert_one_line_error(proc, "1", "2")
    assert not (tmp_path / "out").exists()


def test_run_option_without_resume_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(cli(["run", "--run", "1", "--output-dir", str(tmp_path / "out")], base_env(), tmp_path),
                          "--resume")
    assert not (tmp_path / "out").exists()


def test_export_of_run_1_still_works(db: Path, tmp_path: Path) -> None:
    proc = cli(["export", "1", "--db", str(db), "--output-dir", str(tmp_path / "out")], base_env(), tmp_path)
    assert proc.returncode == 3 and "run 1:" in proc.stdout, proc.stdout + proc.stderr
