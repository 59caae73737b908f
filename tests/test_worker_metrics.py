"""Worker metrics from real `celery -A workers worker` processes (issue 19): the host's metrics port, served
by the main process from its prefork pool's multiprocess files, counts exactly the run's images and has
latency histograms; every expression of the Grafana dashboard names a series that a live worker or serve
exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.cli import cli_popen
from support.farm import Farm, farm_factory, free_port, kill_group, make_tree, wait_for  # noqa: F401

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
    run_id = farm.enqueue(tmp_path / "in", "--batch-size", "1")  # a message per image: counted below
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

    # The dashboard's queries against a real Prometheus scraping the live worker and `stage-a serve`.
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus server here (Debian package prometheus; .ci/run installs it)")
    serve_port = free_port()
    serve_proc = cli_popen(["serve", "--port", str(serve_port)], farm.env(), tmp_path, tmp_path / "serve.log")
    try:
        wait_for(lambda: _up(serve_port), 60, "stage-a serve", on_timeout=lambda: (tmp_path / "serve.log").read_text())
        with real_prometheus(tmp_path, {"stage-a-workers": port, "stage-a-serve": serve_port}) as query:
            wait_for(lambda: query("sum(up)") == [2.0] and query("count(stage_a_worker_images_total)") != [], 60,
                     "two scrapes of both targets")
            wait_for(lambda: query("count(rate(stage_a_worker_images_total[5m]))") != [], 30, "a second scrape")
            results = {e: query(e) for e in exprs}  # raises on any query Prometheus refuses
            assert results["sum by (model) (stage_a_queue_length)"] != []
            assert results["sum(up{job=\"stage-a-workers\"})"] == [1.0]
            filled = [e for e, r in results.items() if r]
            assert len(filled) >= len(exprs) - len(GPU_ONLY) - 3, set(results) - set(filled)
    finally:
        kill_group(serve_proc)


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as res:
            return bool(res.status == 200)
    except OSError:
        return False


@contextmanager
def real_prometheus(tmp_path: Path, targets: dict[str, int]) -> Iterator[Callable[[str], list[float]]]:
    """A Prometheus server scraping ``targets`` (job -> port on 127.0.0.1) every second; yields a query
    function returning the values of an instant query (raising when Prometheus refuses the expression)."""
    import urllib.parse

    port = free_port()
    jobs = "".join(f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{p}']}}]\n"
                   for job, p in targets.items())
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{jobs}")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()

    def query(expr: str) -> list[float]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as res:
            body = json.loads(res.read())
        assert body["status"] == "success", (expr, body)
        return [float(r["value"][1]) for r in body["data"]["result"]]

    try:
        wait_for(lambda: _ready(port), 60, "prometheus ready", on_timeout=lambda: (tmp_path / "prometheus.log").read_text())
        yield query
    finally:
        kill_group(proc)
        proc.wait(10)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as res:
            return bool(res.status == 200)
    except OSError:
        return False
