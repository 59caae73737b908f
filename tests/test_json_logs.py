"""STAGE_A_LOG_FORMAT=json: one JSON object per line, with the batch's fields, from `stage-a run` and
from a farm worker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import Farm, farm_factory, make_tree, wait_for  # noqa: F401

MISSION = "挡风板安装检查"


def _objects(text: str) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_the_formatter_keeps_the_fields_a_record_has() -> None:
    from stage_a.logs import JsonFormatter

    record = logging.LogRecord("engine.steploop", logging.INFO, __file__, 1, "run %d: batch", (3,), None)
    record.run, record.images, record.seconds = 3, 8, 1.25
    obj = json.loads(JsonFormatter(lambda: {"worker": "w2@vm:77"}).format(record))
    assert obj["message"] == "run 3: batch" and obj["level"] == "info" and obj["logger"] == "engine.steploop"
    assert (obj["run"], obj["images"], obj["seconds"], obj["worker"]) == (3, 8, 1.25, "w2@vm:77")
    assert obj["time"].endswith("Z") and "tokens" not in obj


def test_a_bad_log_format_is_one_line(tmp_path: Path) -> None:
    proc = cli(["runs", "--db", str(tmp_path / "x.db")], base_env(STAGE_A_LOG_FORMAT="yaml"), tmp_path, timeout=60)
    assert proc.returncode == 2 and "STAGE_A_LOG_FORMAT must be one of text, json" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_stage_a_run_logs_json_lines_with_batch_fields(tmp_path: Path, tiny_checkpoint: Path) -> None:
    make_tree(tmp_path / "in", groups=3, per_group=2)
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
                "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4",
                "--log-level", "info"], base_env(STAGE_A_LOG_FORMAT="json", STAGE_A_CACHE_DIR=str(tmp_path / "cache")),
               tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    objects = _objects(proc.stderr)
    assert objects and all(set(o) >= {"time", "level", "logger", "message"} for o in objects)
    batches = [o for o in objects if o["logger"] == "engine.steploop" and "batch" in o]
    assert sum(o["images"] for o in batches) == 6, batches
    assert all({"run", "worker", "seconds", "tokens"} <= set(o) for o in batches)
    # Every log record is JSON (the progress and result lines are not log records).
    assert not [ln for ln in lines if ln.startswith("stage-a: info") or ln.startswith("stage-a: warning")], lines


@pytest.mark.slow
def test_a_worker_logs_json_lines_with_its_name(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_LOG_FORMAT="json")
    w = farm.worker("js")
    wait_for(lambda: w.ready(), 90, "the worker ready", on_timeout=farm.logs)
    run_id = farm.enqueue(tmp_path / "in")
    farm.wait_finished(run_id, 120)
    batches = wait_for(lambda: [o for o in _objects(w.log()) if o.get("batch")] or None, 30, "a batch log line",
                       on_timeout=farm.logs)
    assert sum(o["images"] for o in batches) == 4
    assert all(o["run"] == run_id and o["worker"].startswith("js@") and ":" in o["worker"] for o in batches), batches
