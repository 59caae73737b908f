"""The run counters (revision 0006's triggers) against a full count of the rows they summarize."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import text

_FULL = """
SELECT
  SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), SUM(CASE WHEN status = 'leased' THEN 1 ELSE 0 END),
  SUM(CASE WHEN status = 'done' THEN 1 ELSE 0 END), SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END),
  SUM(CASE WHEN status = 'done' AND reused_from IS NOT NULL THEN 1 ELSE 0 END),
  COUNT(preprocess_ms), COUNT(generate_ms), COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(prompt_tokens), 0),
  COALESCE(SUM(preprocess_ms), 0), COALESCE(SUM(generate_ms), 0),
  COALESCE(SUM(CASE WHEN completion_tokens IS NOT NULL THEN COALESCE(generate_ms, 0) ELSE 0 END), 0),
  MIN(CASE WHEN status IN ('done', 'failed') THEN updated_at END),
  MAX(CASE WHEN status IN ('done', 'failed') THEN updated_at END)
FROM images WHERE run_id = :run
"""
_FIELDS = ("pending", "leased", "done", "failed", "reused", "preprocess_n", "generate_n", "completion_tokens",
           "prompt_tokens", "preprocess_ms_sum", "generate_ms_sum", "generate_ms_with_tokens")
_GROUPS = """
SELECT g.position, g.n_images, g.n_done, g.n_failed,
  (SELECT COUNT(*) FROM images i WHERE i.run_id = g.run_id AND i.group_position = g.position AND i.status = 'done'),
  (SELECT COUNT(*) FROM images i WHERE i.run_id = g.run_id AND i.group_position = g.position AND i.status = 'failed')
FROM groups g WHERE g.run_id = :run
"""


def counter_mismatches(engine: Any, run_id: int) -> list[str]:
    """What the counters of ``run_id`` get wrong against a full count, read in one snapshot (empty: exact)."""
    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            c = c.execution_options(isolation_level="REPEATABLE READ")
        with c.begin():
            full = c.execute(text(_FULL), {"run": run_id}).one()
            counters = c.execute(text(f"SELECT {', '.join(_FIELDS)}, first_result, last_result, groups_done, "
                                      "groups_failed FROM run_counts WHERE run_id = :run"), {"run": run_id}).one()
            groups = c.execute(text(_GROUPS), {"run": run_id}).all()
            models_full = dict(((m or "", e or ""), n) for m, e, n in c.execute(text(
                "SELECT model, engine, COUNT(*) FROM images WHERE run_id = :run AND status = 'done' GROUP BY model, engine"),
                {"run": run_id}))
            models = {(m, e): n for m, e, n in c.execute(text(
                "SELECT model, engine, images FROM run_models WHERE run_id = :run AND images <> 0"), {"run": run_id})}
            workers_full = {w for (w,) in c.execute(text(
                "SELECT DISTINCT worker FROM images WHERE run_id = :run AND worker IS NOT NULL"), {"run": run_id})}
            workers = {w for (w,) in c.execute(text("SELECT worker FROM run_workers WHERE run_id = :run"), {"run": run_id})}
    out = []
    for i, name in enumerate(_FIELDS):
        want, got = full[i] or 0, counters[i] or 0
        if not math.isclose(float(want), float(got), rel_tol=1e-9, abs_tol=1e-6):
            out.append(f"{name}: counter {got}, full count {want}")
    first, last = full[12], full[13]
    if first is not None and (counters[12] is None or str(counters[12]) > str(first)):
        out.append(f"first_result {counters[12]} is after the earliest result {first}")
    if last is not None and (counters[13] is None or str(counters[13]) < str(last)):
        out.append(f"last_result {counters[13]} is before the latest result {last}")
    groups_done = sum(1 for _, n, _, _, d, _ in groups if d == n)
    groups_failed = sum(1 for _, _, _, _, _, f in groups if f > 0)
    if (counters[14], counters[15]) != (groups_done, groups_failed):
        out.append(f"groups done/failed: counters {counters[14]}/{counters[15]}, full count {groups_done}/{groups_failed}")
    bad = [(p, nd, nf, d, f) for p, _, nd, nf, d, f in groups if (nd, nf) != (d, f)]
    if bad:
        out.append(f"{len(bad)} group counters wrong, e.g. (position, n_done, n_failed, done, failed) {bad[:3]}")
    if models != models_full:
        out.append(f"models: counters {models}, full count {models_full}")
    if not workers_full <= workers:
        out.append(f"workers missing from run_workers: {sorted(workers_full - workers)[:5]}")
    return out


def assert_counters_exact(engine: Any, run_ids: list[int] | None = None) -> None:
    """Every run's counters (or ``run_ids``') equal a full count of its rows."""
    if run_ids is None:
        with engine.connect() as c:
            run_ids = [int(r) for (r,) in c.execute(text("SELECT id FROM runs ORDER BY id"))]
    problems = {r: m for r in run_ids if (m := counter_mismatches(engine, r))}
    assert not problems, f"run counters differ from a full count: {problems}"
