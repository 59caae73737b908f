"""`stage-a cancel` of a finished run changes nothing: a finished run never turns "cancelled"."""

from __future__ import annotations

from pathlib import Path

from support.cli import base_env, cli

from stage_a.config import RunSpec
from stage_a.store import GroupInput, ResultStore
from stage_a.work import ImageKey, ImageResult


def test_cancel_of_a_finished_run_is_refused_politely(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = ResultStore(url)
    run_id = store.create_run(RunSpec(mission="挡风板安装检查", dataset="bbu", input_root=str(tmp_path)),
                              [GroupInput("QC-1", "pass", ("a.jpg", "b.jpg"))])
    store.record_results([ImageResult(ImageKey(run_id, 0, 1), summary="无关图片"),
                          ImageResult(ImageKey(run_id, 0, 2), error="truncated")], "w")
    store.close()

    proc = cli(["cancel", str(run_id), "--db", url], base_env(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already finished (1 done, 1 failed); nothing to cancel" in proc.stdout
    status = cli(["status", str(run_id), "--db", url, "--json"], base_env(), tmp_path)
    assert '"state": "finished"' in status.stdout, status.stdout
    store = ResultStore(url)
    assert store.get_run(run_id).cancelled_at is None
    store.close()
