"""Worker metrics from real `celery -A workers worker` processes (issue 19): the host's metrics port, served
by the main process from its prefork pool's multiprocess files, counts exactly the run's images and has
latency histograms; every expression of the Grafana dashboard names a series that a live worker or serve
exports."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.farm import Farm, farm_factory, free_port, make_tree, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GPU_ONLY = {"stage_a_worker_device_memory_used_bytes", "stage_a_worker_device_memory_total_bytes",
            "stage_a_worker_vllm_kv_cache_usage_ratio", "stage_a_worker_vllm_sequences"}
DASHBOARD = REPO / "deploy" / "grafana" / "stage-a.json"
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "by", "without", "on", "ignoring", "group_left", "histogram_quantile",
                "le", "avg", "max", "min", "count", "and", "or", "unless", "time", "clamp_min", "topk", "delta",
                "changes", "bool", "offset", "label_replace", "vector", "scalar", "abs", "resets", "sort_desc"}


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
        return res.read().decode()


def values(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def exported_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside label matchers, braces and durations."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|by \([^)]*\)|without \([^)]*\)|on \([^)]*\)", " ", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if w not in PROMQL_WORDS} - {"e"}


def dashboard_exprs() -> list[str]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_worker_metrics_after_a_run_and_every_dashboard_series_exported(pg_url: str, farm_factory,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.settings import Settings

    farm: Farm = farm_factory(pg_url)
    port = free_port()
    worker = farm.worker("m1", STAGE_A_METRICS_PORT=str(port))
    wait_for(worker.ready, 120, "worker ready", on_timeout=farm.logs)
    before = fetch(port)
    assert values(before, "stage_a_worker_processes_ready") == 1, before
    assert values(before, "stage_a_worker_model_load_seconds_count") == 1
    make_tree(tmp_path / "in", groups=3, per_group=2)
    next((tmp_path / "in").rglob("*.jpg")).write_bytes(b"not a JPEG")  # one failure, by class
    run_id = farm.enqueue(tmp_path / "in")
    counts = farm.wait_finished(run_id, 240)
    n = counts.done + counts.failed
    assert n == 6 and counts.failed == 1
    # The counters are written right after each batch's results are committed: wait for the last one.
    def counted() -> str | None:
        t = fetch(port)
        return t if values(t, "stage_a_worker_images_total") == n else None

    text = wait_for(counted, 30, "the worker's image counter to reach the run's images", on_timeout=lambda: fetch(port))
    assert values(text, "stage_a_worker_images_total", outcome="done") == n - 1
    assert values(text, "stage_a_worker_images_total", outcome="failed") == 1
    assert values(text, "stage_a_worker_failures_total", **{"class": "unreadable_image"}) == 1
    assert values(text, "stage_a_worker_failures_total") == 1
    # per_image: one message per image; the failed image's message is the one failed message.
    assert values(text, "stage_a_worker_messages_total", outcome="done") == n - 1
    assert values(text, "stage_a_worker_messages_total", outcome="failed") == 1
    for stage in ("prepare", "generate", "batch"):
        assert values(text, "stage_a_worker_batch_seconds_count", stage=stage) >= 1, stage
        assert values(text, "stage_a_worker_batch_seconds_sum", stage=stage) > 0, stage
    assert values(text, "stage_a_worker_batch_images_sum") == n
    assert values(text, "stage_a_worker_generation_tokens_total") > 0
    assert values(text, "stage_a_worker_prompt_tokens_total") > 0
    labels = {k for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("stage_a_")
              for k in s.labels}
    assert labels <= {"mission", "model", "engine", "outcome", "class", "stage", "gpu", "state", "le"}, labels

    store = farm.store()
    try:
        serve = TestClient(create_app(store, Settings.from_env(farm.env()))).get("/metrics").text
    finally:
        store.close()
    assert values(serve, "stage_a_images_finished_total", outcome="done") == n - 1
    assert values(serve, "stage_a_images_finished_total", outcome="failed") == 1
    exported = exported_names(text) | exported_names(serve) | {"up"}  # `up`: Prometheus' own, per scrape target
    # Series that exist only on a GPU (device memory) or with the vLLM engine: this CPU worker cannot show
    # them live, so they must at least be the names workers/metrics.py defines.
    source = (REPO / "workers" / "metrics.py").read_text(encoding="utf-8")
    for name in GPU_ONLY:
        assert f'"{name.removesuffix("_bytes").removesuffix("_ratio")}' in source or f'"{name}"' in source, name
    exported |= GPU_ONLY
    # Histogram series are read through their _bucket/_sum/_count; a counter through its _total.
    exprs = dashboard_exprs()
    assert len(exprs) >= 8
    missing = {(e, m) for e in exprs for m in metric_names(e) if m not in exported}
    assert not missing, missing
