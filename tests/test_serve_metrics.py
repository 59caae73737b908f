"""`stage-a serve` /metrics (issue 19): counters with mission/model labels, per-model queue lengths, the
runs no online worker can serve, and no broker series for a store that has no broker (SQLite)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stage_a.config import RunSpec
from stage_a.settings import Settings
from stage_a.store import GroupInput, ResultStore
from stage_a.work import ImageKey, ImageResult

MISSION = "挡风板安装检查"


def scrape(store: ResultStore, **env: str) -> tuple[dict[str, Any], float]:
    from starlette.testclient import TestClient

    from monitor.web.app import create_app

    client = TestClient(create_app(store, Settings.from_env(env)))
    t0 = time.perf_counter()
    res = client.get("/metrics")
    elapsed = time.perf_counter() - t0
    assert res.status_code == 200, res.text
    return {f.name: f for f in text_string_to_metric_families(res.text)}, elapsed


def samples(fams: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in fams.values() for s in f.samples if s.name == name}


def seed(store: ResultStore, farm: bool, model: str | None = None) -> int:
    run = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere", checkpoint="/m/ck"),
                           [GroupInput("QC-1", "pass", ("a.jpg", "b.jpg", "c.jpg"))], farm=farm, model=model)
    store.record_results([ImageResult(key=ImageKey(run, 0, 1), summary="无关图片", completion_tokens=3),
                          ImageResult(key=ImageKey(run, 0, 2), error="corrupt image b.jpg: truncated")], "w@h")
    return run


def test_sqlite_store_has_no_broker_series_and_counts_finished_images(tmp_path: Path) -> None:
    """A SQLite store is one machine's `stage-a run`: no broker was ever configured, so serve neither probes
    the default Redis nor reports a broker (it used to report stage_a_broker_up 1 for it)."""
    store = ResultStore(f"sqlite:///{tmp_path / 'lite.db'}")
    try:
        run = seed(store, farm=False)
        store.dead_letter("bad message", "{}", "w@h", run)
        fams, _ = scrape(store)
    finally:
        store.close()
    assert not [n for n in fams if n.startswith(("stage_a_broker", "stage_a_queue"))], sorted(fams)
    finished = samples(fams, "stage_a_images_finished_total")
    assert finished == {(("mission", MISSION), ("model", ""), ("outcome", "done")): 1.0,
                        (("mission", MISSION), ("model", ""), ("outcome", "failed")): 1.0}
    assert fams["stage_a_images_finished"].type == "counter"
    assert samples(fams, "stage_a_dead_letters_total") == {(): 1.0}
    images = samples(fams, "stage_a_run_images")
    assert images[(("mission", MISSION), ("model", ""), ("run", str(run)), ("state", "pending"))] == 1.0


def test_farm_store_reports_queue_per_model_and_runs_no_worker_can_serve(pg_url: str) -> None:
    from stage_a.queue import TaskQueue

    queue = f"stage_a_test_metrics_{uuid.uuid4().hex[:8]}"
    env = {"STAGE_A_BROKER_URL": "redis://127.0.0.1:6379/0", "STAGE_A_QUEUE": queue}
    store = ResultStore(pg_url)
    tq = TaskQueue(Settings.from_env(env))
    try:
        run = seed(store, farm=True, model="m-aaaaaaaaaaaaaaaaaaaaaaaa")
        tq.send([{"run_id": run, "group_position": 0, "image_index": 3}], tq.queue_for("m-aaaaaaaaaaaaaaaaaaaaaaaa"))
        fams, elapsed = scrape(store, **env)
        assert samples(fams, "stage_a_broker_up") == {(): 1.0}
        assert samples(fams, "stage_a_queue_length") == {(("model", ""),): 0.0, (("model", "m-aaaaaaaaaaaaaaaaaaaaaaaa"),): 1.0}
        key = (("mission", MISSION), ("model", "m-aaaaaaaaaaaaaaaaaaaaaaaa"), ("run", str(run)))
        assert samples(fams, "stage_a_run_unserved") == {key: 1.0}
        assert samples(fams, "stage_a_run_created_timestamp_seconds")[key] > 1.7e9
        # A worker pinned to another model does not serve it; one holding its model does.
        store.heartbeat("gpu0@b", "ready", model="m-bbbbbbbbbbbbbbbbbbbbbbbb", pinned=True, started=True)
        fams, _ = scrape(store, **env)
        assert samples(fams, "stage_a_run_unserved") == {key: 1.0}
        assert samples(fams, "stage_a_workers_online") == {(("model", "m-bbbbbbbbbbbbbbbbbbbbbbbb"),): 1.0}
        store.heartbeat("gpu0@a", "ready", model="m-aaaaaaaaaaaaaaaaaaaaaaaa", pinned=True, started=True)
        fams, _ = scrape(store, **env)
        assert samples(fams, "stage_a_run_unserved") == {key: 0.0}
    finally:
        with tq.app.connection_for_write() as conn:
            client = conn.default_channel.client
            client.delete(tq.queue_for(None), tq.queue_for("m-aaaaaaaaaaaaaaaaaaaaaaaa"))
        store.close()
    print(f"serve /metrics scrape: {elapsed * 1000:.1f} ms")


@pytest.mark.parametrize("value", ["-1", "70000", "x"])
def test_metrics_port_setting_is_checked(value: str) -> None:
    from stage_a.errors import UserError

    with pytest.raises(UserError, match="STAGE_A_METRICS_PORT"):
        Settings.from_env({"STAGE_A_METRICS_PORT": value})
    assert Settings.from_env({"STAGE_A_METRICS_PORT": ""}).metrics_port == 0


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    """deploy/prometheus: the config and rules load, and the rules' unit tests (stalled run, no worker, ...)
    pass; .ci/run runs the same commands."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    here = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        proc = subprocess.run([promtool, *args], cwd=here, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
