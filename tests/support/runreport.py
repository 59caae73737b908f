"""Check an end-of-run report (``<mission>_stage_a_report.json``) against the store's rows, recomputed
here in Python from every finished row (numpy's linear percentiles are percentile_cont's)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from stage_a.failures import failure_class


def check_report(report: dict[str, Any], db_url: str, run_id: int) -> None:
    url = db_url if "://" in db_url else f"sqlite:///{db_url}"
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(text(
                "SELECT status, worker, updated_at, preprocess_ms, generate_ms, prompt_tokens, completion_tokens, "
                "error FROM images WHERE run_id = :r"), {"r": run_id})]
            created = c.execute(text("SELECT created_at FROM runs WHERE id = :r"), {"r": run_id}).scalar()
    finally:
        engine.dispose()
    for r in rows:  # SQLite's raw rows give times as text
        r["updated_at"] = _time(r["updated_at"])
    created = _time(created)
    fin = [r for r in rows if r["status"] in ("done", "failed")]
    assert report["run_id"] == run_id and report["images_total"] == len(rows)
    assert report["done"] == sum(r["status"] == "done" for r in rows)
    assert report["failed"] == sum(r["status"] == "failed" for r in rows)
    assert report["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in rows)
    assert report["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows) > 0
    for stage in ("preprocess_ms", "generate_ms"):
        values = np.array([r[stage] for r in fin if r[stage] is not None], dtype=float)
        d = report["per_image"][stage]
        assert d["n"] == len(values) > 0
        assert d["p50"] == pytest.approx(np.percentile(values, 50), abs=2e-3, rel=1e-6)
        assert d["p95"] == pytest.approx(np.percentile(values, 95), abs=2e-3, rel=1e-6)
        assert d["max"] == pytest.approx(values.max(), abs=2e-3)
    batches: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in fin:
        batches[(r["worker"], r["updated_at"])].append(r)
    assert report["batches"] == len(batches)
    # A batch's latency sums its images' shares; a batch with none recorded (it failed before) has none.
    gen = np.array([sum(r["generate_ms"] for r in b if r["generate_ms"] is not None) for b in batches.values()
                    if any(r["generate_ms"] is not None for r in b)])
    assert report["per_batch"]["generate_ms"]["n"] == len(gen)
    assert report["per_batch"]["generate_ms"]["p95"] == pytest.approx(np.percentile(gen, 95), abs=2e-3, rel=1e-6)
    assert report["per_batch"]["images"]["max"] == max(len(b) for b in batches.values())
    per_worker: dict[str, int] = defaultdict(int)
    for r in fin:
        per_worker[r["worker"]] += 1
    assert {w["worker"]: w["images"] for w in report["workers"]} == per_worker
    assert sum(w["share"] for w in report["workers"]) == pytest.approx(1.0, abs=0.01)
    classes: dict[str, int] = defaultdict(int)
    for r in fin:
        if r["status"] == "failed":
            classes[failure_class(r["error"])] += 1
    assert report["failures_by_class"] == classes
    last = max(r["updated_at"] for r in fin)
    first = min(r["updated_at"] for r in rows if r["updated_at"] is not None)
    assert report["wall_s"] == pytest.approx((last - created).total_seconds(), abs=2e-3)
    active = (last - first).total_seconds()
    assert report["active_s"] == pytest.approx(active, abs=2e-3)
    assert report["device_hours"] == pytest.approx(len(per_worker) * active / 3600, abs=1e-3)
    assert report["model_load_s"] is None and report["model_load_note"].startswith("not recorded")


def _time(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value
