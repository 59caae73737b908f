"""The run page's filters and search return exactly the right groups, paged by keyset forwards and
backwards (SQLite and PostgreSQL); the views read counters and bounded queries, never an aggregate
over a run's images (checked on the statements they send); PostgreSQL's plans use the filter indexes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, text

from stage_a.config import GenerationParams, RunSpec
from stage_a.settings import Settings
from stage_a.store import GroupInput, ResultStore
from stage_a.store.queries import IRRELEVANT, ImageFilter, PageGroup
from stage_a.work import ImageKey, ImageResult

MISSION = "挡风板安装检查"
STATS = '{"统计": [{"类别": "BBU设备", "品牌": {"爱立信": 1}}]}'
SUMMARIES = (IRRELEVANT, STATS, "华为 50% 安装", '{"统计": [{"类别": "挡风板", "安装状态": {"已安装": 1}}]}')
ERROR = "cannot identify image file 爱立信_x"



def _spec() -> RunSpec:
    return RunSpec(mission=MISSION, dataset="bbu", input_root="/data/in", checkpoint="/models/x",
                   sharding_mode="per_image", batch_size=4, generation=GenerationParams(max_new_tokens=16))


def _seed(store: ResultStore, n_groups: int = 17) -> tuple[int, dict[tuple[int, int], dict[str, str | None]]]:
    """A run whose images cover every filter; returns it and {(position, index): its row as stored}."""
    groups = [GroupInput(f"QC-T-20240101-{g:07d}", "fail" if g % 3 == 0 else "pass",
                         tuple(f"{MISSION}/g{g:02d}/{g}-{i}.jpg" for i in range(1 + g % 3))) for g in range(n_groups)]
    run = store.create_run(_spec(), groups, farm=True)
    store.create_run(_spec(), groups[:4], farm=True)  # another run's rows never show
    rows: dict[tuple[int, int], dict[str, str | None]] = {}
    done, failed = [], []
    for p, g in enumerate(groups):
        for i, path in enumerate(g.images, start=1):
            k = (p * 7 + i) % 10
            status = "failed" if k == 3 else "pending" if k in (5, 8) else "done"
            summary = SUMMARIES[(p + i) % len(SUMMARIES)] if status == "done" else None
            rows[(p, i)] = {"status": status, "summary": summary, "error": ERROR if status == "failed" else None,
                            "rel_path": path, "label": g.label, "group_id": g.group_id}
            key = ImageKey(run, p, i)
            if status == "done":
                done.append(ImageResult(key, summary=summary, raw_text="x"))
            elif status == "failed":
                failed.append(ImageResult(key, error=ERROR))
    store.record_results(done + failed, "w1@test", "m", "transformers")
    return run, rows


def _matches(row: dict[str, str | None], flt: ImageFilter) -> bool:
    if flt.label and row["label"] != flt.label:
        return False
    if flt.failed and row["status"] != "failed":
        return False
    if flt.irrelevant and row["summary"] != IRRELEVANT:
        return False
    # A search's rule (stage_a.store.search): the group id, or a finished image's own text.
    finished = row["status"] in ("done", "failed")
    if flt.text and not (flt.text in str(row["group_id"])
                         or finished and any(flt.text in (row[c] or "") for c in ("summary", "error", "rel_path"))):
        return False
    return True


def _expected(rows: dict[tuple[int, int], dict[str, str | None]], flt: ImageFilter) -> list[tuple[int, list[int]]]:
    """(position, image indexes shown) of every group the filter shows, in output order."""
    by_pos: dict[int, list[int]] = {}
    for (p, i), row in sorted(rows.items()):
        if _matches(row, flt):
            by_pos.setdefault(p, []).append(i)
    if not (flt.failed or flt.irrelevant or flt.text):  # a group with no image rows still shows
        return [(p, by_pos.get(p, [])) for p in sorted({p for p, _ in rows}) if p in by_pos]
    return sorted(by_pos.items())


def _shown(groups: list[PageGroup]) -> list[tuple[int, list[int]]]:
    return [(g.position, [im.image_index for im in g.images]) for g in groups]


FILTERS = [
    ImageFilter(),
    ImageFilter(failed=True),
    ImageFilter(irrelevant=True),
    ImageFilter(label="fail"),
    ImageFilter(label="pass", irrelevant=True),
    ImageFilter(label="fail", failed=True),
    ImageFilter(text="爱立信"),  # summaries and errors
    ImageFilter(text="g07/"),  # a path: done and failed rows (a pending row is found by its group id)
    ImageFilter(text="0000007"),  # a group id: every row of the group, pending ones too
    ImageFilter(text="QC-T-20240101-0000011"),  # a whole group id: its common words are not asked of the index
    ImageFilter(text="20240101-000001"),  # a fragment common to ten group ids
    ImageFilter(text="g07/7-1.jpg"),  # a finished image's file, one pending image of its group not found
    ImageFilter(text="50%"),  # LIKE's wildcard taken literally
    ImageFilter(text="_x"),
    ImageFilter(text=f"_x {MISSION}"),  # spans the error and the path: no column holds it
    ImageFilter(text="nowhere"),
    ImageFilter(text="爱立信", label="pass", failed=True),
]


CASES = [(f, 2500) for f in FILTERS] + [(f, 2) for f in FILTERS if f.text]
"""(filter, search window); a window of 2 groups: PostgreSQL's search reads most pages beyond it through
the trigram index."""


@pytest.mark.parametrize(("flt", "window"), CASES, ids=lambda x: repr(x).replace(" ", ""))
def test_filters_and_search_page_exactly_the_matching_groups(store: ResultStore, flt: ImageFilter, window: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stage_a.store.queries.SEARCH_WINDOW", window)
    run, rows = _seed(store)
    want = _expected(rows, flt)
    if flt.text == "nowhere" or flt.text == f"_x {MISSION}":
        assert want == []
    else:
        assert want, f"the seed covers {flt}"
    for per in (1, 3, 50):
        # Forwards from the first page, each page after the last group of the one before.
        pages, after = [], None
        while True:
            groups, more = store.queries.page_groups(run, flt, after=after, limit=per)
            assert len(groups) <= per
            pages += _shown(groups)
            if not more:
                break
            after = groups[-1].position
        assert pages == want, (per, flt)
        # Backwards from past the last group: each page the ``per`` groups before the first of the last.
        back: list[tuple[int, list[int]]] = []
        before = max(p for p, _ in rows) + 1
        while True:
            groups, more = store.queries.page_groups(run, flt, before=before, limit=per)
            back = _shown(groups) + back
            if not more:
                break
            before = groups[0].position
        assert back == want, (per, flt)


# ---- the views send no aggregate over a run's images ------------------------------------------------


@contextmanager
def _statements(store: ResultStore) -> Iterator[list[str]]:
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        sent.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def _unbounded_image_reads(statements: list[str]) -> list[str]:
    """Statements that read the images table other than by a bounded query: every SELECT of images must
    stop at a LIMIT or read the groups of one page by their positions, and group nothing itself (a range
    of positions is not bounded: a filter's matches on one page may lie a run apart)."""
    bad = []
    for sql in statements:
        flat = " ".join(sql.split())
        for m in re.finditer(r"FROM images\b", flat):
            depth, end = 0, len(flat)
            for j in range(m.end(), len(flat)):  # this SELECT's own text: up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(flat[j], 0)
                if depth < 0:
                    end = j
                    break
            own = flat[m.end():end]
            if "GROUP BY" in own or not ("LIMIT" in own or "group_position IN (" in own):
                bad.append(flat)
    return bad


def test_views_read_counters_and_bounded_queries_only(store: ResultStore) -> None:
    from starlette.testclient import TestClient

    from monitor.report import build_report, list_runs
    from monitor.web.app import create_app

    run, _ = _seed(store)
    settings = Settings.from_env({})
    client = TestClient(create_app(store, settings))
    urls = [f"/runs/{run}", f"/runs/{run}?failed=1", f"/runs/{run}?irrelevant=1&label=pass", f"/runs/{run}?after=5",
            f"/runs/{run}?before=9&label=fail", f"/runs/{run}?q=%E7%88%B1", f"/api/runs/{run}", "/", "/metrics",
            "/api/runs"]
    with _statements(store) as sent:
        build_report(store, run, settings).to_json()  # status, with the writers' names
        list_runs(store, 50, settings)
        for u in urls:
            assert client.get(u).status_code == 200, u
    assert sent and not _unbounded_image_reads(sent), _unbounded_image_reads(sent)[:3]

    # A finished run's page shows its end-of-run report (an aggregate of every row): once per state of
    # the run's counters, then from memory until a write moves them.
    with store.engine.begin() as c:
        c.execute(text("UPDATE images SET status = 'done', summary = 'x' WHERE run_id = :r AND status = 'pending'"),
                  {"r": run})
    with _statements(store) as first:
        assert 'id="report"' in client.get(f"/runs/{run}").text
    assert _unbounded_image_reads(first)
    with _statements(store) as again:
        assert 'id="report"' in client.get(f"/runs/{run}").text
    assert not _unbounded_image_reads(again), _unbounded_image_reads(again)[:3]


def test_failure_classes_read_the_first_failures_only(store: ResultStore) -> None:
    from monitor.report import build_report
    from monitor.text import describe
    from stage_a.failures import failure_class

    run, rows = _seed(store)
    n_failed = sum(1 for r in rows.values() if r["status"] == "failed")
    assert store.queries.failure_texts(run) == [(ERROR, n_failed)]
    assert store.queries.failure_texts(run, rows=2) == [(ERROR, 2)]
    report = build_report(store, run, Settings.from_env({}))
    assert report.failures_by_class == {failure_class(ERROR): n_failed} and report.failures_classified == n_failed
    assert "(first" not in describe(report)


# ---- PostgreSQL's plans -----------------------------------------------------------------------------


def test_postgres_plans_use_the_filter_and_search_indexes(pg_url: str) -> None:
    from stage_a.store.queries import _image_conditions

    store = ResultStore(pg_url)
    try:
        run, _ = _seed(store)
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE images"))  # what autovacuum does: index-only reads become possible
        with store.engine.connect() as c:
            has_trgm = c.execute(text("SELECT 1 FROM pg_indexes WHERE indexname = 'ix_images_search'")).first()
        assert has_trgm, "pg_trgm is available on the test server: the migration creates the search index"
        # (filter, which rows a text is searched in, the index, what its condition asks for, what it must not)
        cases = [(ImageFilter(failed=True), "exact", "ix_images_failed", "", None),
                 (ImageFilter(irrelevant=True), "exact", "ix_images_irrelevant", "", None),
                 (ImageFilter(text="爱立信"), "finished", "ix_images_search", "爱立信", None),
                 # Every sampled group id holds 20240101 and "000": only the rest of the rare word is asked.
                 (ImageFilter(text="QC-T-20240101-0000011"), "groups", "ix_groups_search", "'%0011%'", "20240101")]
        from sqlalchemy import select

        from stage_a.store.models import GroupRow, ImageRow
        from stage_a.store.queries import _GROUP_JOIN
        from stage_a.store.search import rare_words

        for flt, rows, index, asked, not_asked in cases:
            with store.engine.connect() as c:
                rare = rare_words(c, run, flt.text, 16) if flt.text else None  # positions 0..16
            conds = _image_conditions(run, flt, rows, rare)
            assert conds is not None
            q = select(ImageRow.group_position).where(*conds).distinct().order_by(ImageRow.group_position).limit(21)
            if flt.text:
                q = q.join(GroupRow, _GROUP_JOIN)
            compiled = q.compile(store.engine)  # with its parameters bound as the page sends them
            with store.engine.begin() as c:
                # Only this index left, in a rolled-back
                # transaction: the plan uses it exactly when its expression and predicate match the query's.
                c.execute(text("SET LOCAL enable_seqscan = off"))
                c.execute(text("ALTER TABLE images DROP CONSTRAINT images_pkey CASCADE"))
                c.execute(text("ALTER TABLE groups DROP CONSTRAINT groups_pkey CASCADE"))
                for other in ("ix_images_run_updated", "ix_images_run_status", "ix_images_failed",
                              "ix_images_irrelevant", "ix_images_search", "ix_groups_search", "ix_groups_label"):
                    if other != index:
                        c.execute(text(f"DROP INDEX {other}"))
                plan = "\n".join(r[0] for r in c.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params))
                c.rollback()
            assert index in plan, (flt, plan)
            cond = " ".join(line for line in plan.splitlines() if "Index Cond" in line)
            assert asked in cond and (not_asked is None or not_asked not in cond), (flt, plan)
    finally:
        store.close()


def test_a_search_asks_the_index_for_its_whole_words_only() -> None:
    from stage_a.store.search import words

    assert words("QC-T-20240101-0000011") == ["20240101", "0000011"]  # "QC" and "T" give no trigram
    assert words("两台BBU上下堆叠 timeout timeout") == ["两台BBU上下堆叠", "timeout"]
    assert words("50% _x g07/") == ["g07"]


def test_a_rare_word_is_asked_without_the_trigrams_half_the_run_holds() -> None:
    from stage_a.store.search import index_parts

    sample = [f"qc-bench-20250101-{n:07d}" for n in range(0, 3_000_000, 30_001)]
    assert index_parts("1250000", sample) == ["125", "50000"]  # "250" is in every date
    assert index_parts("20250102", sample) == ["20250102"]  # one trigram left ("102"): asked whole
    assert index_parts("QXZY", sample) == ["QXZY"]  # nothing common
    assert index_parts("1250000", []) == ["1250000"]  # no sample (no finished row yet)
    # Lowercasing "İ" gives two characters: the cuts still fall on the word's own characters.
    izmir = [f"/İZMİR/{n:05d}".lower() for n in range(100)]
    assert index_parts("İZMİR12", izmir) == ["İR12"]
    assert all(len(part) >= 3 for part in index_parts("İİİİİİİİzq", ["i̇i̇i̇i̇i̇i̇"] * 10))
