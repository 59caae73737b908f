"""The results store on the real PostgreSQL (127.0.0.1:5432) and on SQLite, same assertions for both."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from support.store import image_rows, release

from stage_a.config import GenerationParams, RunSpec
from stage_a.store import GroupInput, ResultStore
from stage_a.store.models import DONE, FAILED, LEASED, PENDING
from stage_a.work import ImageKey, ImageResult, WorkItem

MISSION = "挡风板安装检查"
# Output order as discovery gives it: fail groups, then pass groups; G1 is resubmitted under both labels.
GROUPS = [
    GroupInput("QC-T-20240101-0000001", "fail", (f"{MISSION}/审核不通过/QC-T-20240101-0000001/a_1.jpg",
                                                 f"{MISSION}/审核不通过/QC-T-20240101-0000001/a_2.jpg")),
    GroupInput("QC-T-20240101-0000003", "fail", (f"{MISSION}/审核不通过/QC-T-20240101-0000003/c.jpg",)),
    GroupInput("QC-T-20240101-0000001", "pass", (f"{MISSION}/审核通过/QC-T-20240101-0000001/b_1.jpg",
                                                 f"{MISSION}/审核通过/QC-T-20240101-0000001/b_2.jpg",
                                                 f"{MISSION}/审核通过/QC-T-20240101-0000001/b_10.jpg")),
    GroupInput("QC-T-20240101-0000002", "pass", (f"{MISSION}/审核通过/QC-T-20240101-0000002/d.jpg",)),
]
N_IMAGES = sum(len(g.images) for g in GROUPS)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    url = request.getfixturevalue("pg_url")
    assert url.startswith("postgresql+psycopg://")
    return str(url)


@pytest.fixture()
def store(db_url: str):  # type: ignore[no-untyped-def]
    s = ResultStore(db_url)
    yield s
    s.close()


def _spec() -> RunSpec:
    return RunSpec(mission=MISSION, dataset="bbu", input_root="/data/in", checkpoint="/models/x",
                   sharding_mode="per_image", batch_size=4, generation=GenerationParams(max_new_tokens=16))


def _ok(key: ImageKey, summary: str = '{"统计": []}') -> ImageResult:
    return ImageResult(key=key, summary=summary, raw_text=summary, prompt_tokens=10, completion_tokens=3,
                       vision_tokens=4, preprocess_ms=1.0, generate_ms=2.0)


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from stage_a.store.engine import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head
    return head


def _all_keys(store: ResultStore, run_id: int) -> list[ImageKey]:
    return [ImageKey(run_id, r["group_position"], r["image_index"]) for r in image_rows(store, run_id)]


def test_create_run_records_groups_and_pending_images(store: ResultStore) -> None:
    run_id = store.create_run(_spec(), GROUPS, farm=True)
    info = store.get_run(run_id)
    assert (info.n_groups, info.n_images) == (len(GROUPS), N_IMAGES)
    assert info.spec == _spec()  # the spec round-trips (workers rebuild it from the row)
    rows = image_rows(store, run_id)
    assert len(rows) == N_IMAGES and {r["status"] for r in rows} == {PENDING}
    assert [(r["group_position"], r["image_index"]) for r in rows] == [
        (p, i) for p, g in enumerate(GROUPS) for i in range(1, len(g.images) + 1)]
    items = store.unfinished_items(run_id)
    assert [it.rel_path for it in items] == [path for g in GROUPS for path in g.images]
    # A second run in the same database is independent.
    other = store.create_run(_spec(), GROUPS[:1])
    assert other != run_id and len(image_rows(store, other)) == 2 and len(image_rows(store, run_id)) == N_IMAGES


def test_record_results_is_idempotent_and_done_is_final(store: ResultStore) -> None:
    run_id = store.create_run(_spec(), GROUPS)
    keys = _all_keys(store, run_id)
    first = [_ok(k, f'{{"统计": [{{"类别": "BBU设备", "n": {i}}}]}}') for i, k in enumerate(keys)]
    store.record_results(first, "w1")
    store.record_results(first, "w1")  # a redelivered batch
    rows = image_rows(store, run_id)
    assert len(rows) == N_IMAGES  # one row per image, never a duplicate
    assert all(r["status"] == DONE and r["worker"] == "w1" for r in rows)
    before = {(r["group_position"], r["image_index"]): r["summary"] for r in rows}

    # A late duplicate from another worker (failure or a different text) never overwrites a done row.
    store.record_results([ImageResult(key=k, error="CUDA out of memory") for k in keys], "w2")
    store.record_results([_ok(k, "something else") for k in keys], "w2")
    rows = image_rows(store, run_id)
    assert len(rows) == N_IMAGES
    assert all(r["status"] == DONE and r["worker"] == "w1" and r["error"] is None for r in rows)
    assert {(r["group_position"], r["image_index"]): r["summary"] for r in rows} == before


def test_failed_row_can_later_succeed_and_empty_summary_is_a_failure(store: ResultStore) -> None:
    run_id = store.create_run(_spec(), GROUPS)
    k1, k2 = _all_keys(store, run_id)[:2]
    store.record_results([ImageResult(key=k1, error="decode error"), ImageResult(key=k2, summary="")], "w1")
    rows = {(r["group_position"], r["image_index"]): r for r in image_rows(store, run_id)}
    assert rows[(0, 1)]["status"] == FAILED and rows[(0, 1)]["error"] == "decode error"
    assert rows[(0, 2)]["status"] == FAILED and rows[(0, 2)]["error"] == "empty summary"
    store.record_results([_ok(k1)], "w2")  # a retry that works
    row = next(r for r in image_rows(store, run_id) if (r["group_position"], r["image_index"]) == (0, 1))
    assert row["status"] == DONE and row["error"] is None and row["worker"] == "w2"


def test_counts(store: ResultStore) -> None:
    run_id = store.create_run(_spec(), GROUPS)
    c = store.queries.counts(run_id)
    assert (c.pending, c.leased, c.done, c.failed) == (N_IMAGES, 0, 0, 0)
    assert (c.groups_total, c.groups_done, c.groups_failed) == (4, 0, 0)
    assert not c.finished and c.workers == () and c.first_update is None

    g0a, g0b, g1, g2a, g2b, g2c, g3 = _all_keys(store, run_id)
    store.lease([g2a, g2b, g2c], "w-b", 600)
    store.record_results([_ok(g0a), _ok(g0b), _ok(g1)], "w-a")
    store.record_results([ImageResult(key=g3, error="unreadable")], "w-b")
    c = store.queries.counts(run_id)
    assert (c.pending, c.leased, c.done, c.failed) == (0, 3, 3, 1)
    assert c.images_total == N_IMAGES
    assert (c.groups_done, c.groups_failed) == (2, 1)
    assert c.workers == ("w-a", "w-b") and not c.finished
    assert c.first_update is not None and c.last_update is not None and c.first_update <= c.last_update

    store.record_results([_ok(k) for k in (g2a, g2b, g2c)], "w-b")
    c = store.queries.counts(run_id)
    assert (c.pending, c.leased, c.done, c.failed) == (0, 0, 6, 1) and c.finished
    assert (c.groups_done, c.groups_failed) == (3, 1)


@pytest.mark.parametrize("page_rows", [5, 20_000])
def test_iter_export_groups_order_with_resubmitted_ids(store: ResultStore, page_rows: int) -> None:
    run_id = store.create_run(_spec(), GROUPS)
    other = store.create_run(_spec(), list(reversed(GROUPS)))  # must not leak into run_id's export
    keys = _all_keys(store, run_id)
    # Results arrive out of order (per_image batches span groups, sorted by length).
    store.record_results([_ok(k, f"s{k.group_position}.{k.image_index}") for k in reversed(keys)], "w")
    store.record_results([_ok(k, "other run") for k in _all_keys(store, other)], "w")

    groups = list(store.queries.iter_export_groups(run_id, batch_rows=page_rows))  # 5 rows: one group per page
    assert [(g.position, g.group_id, g.label) for g in groups] == [
        (p, g.group_id, g.label) for p, g in enumerate(GROUPS)]
    assert [g.group_id for g in groups].count("QC-T-20240101-0000001") == 2
    for pos, (g, expected) in enumerate(zip(groups, GROUPS, strict=True)):
        assert [img.file_name for img in g.images] == [p.rsplit("/", 1)[-1] for p in expected.images]
        assert [img.summary for img in g.images] == [f"s{pos}.{i}" for i in range(1, len(expected.images) + 1)]
        assert {img.status for img in g.images} == {DONE}


def test_migration_runs_once_and_a_second_store_is_a_noop(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ResultStore(db_url)
    run_id = first.create_run(_spec(), GROUPS)
    with first.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == [_head()]

    import alembic.command

    def no_upgrade(*_a: object, **_k: object) -> None:
        raise AssertionError("schema already at head: no migration may run")

    monkeypatch.setattr(alembic.command, "upgrade", no_upgrade)
    second = ResultStore(db_url)  # a second worker / command on the same database
    try:
        assert second.get_run(run_id).n_images == N_IMAGES
        assert len(image_rows(second, run_id)) == N_IMAGES
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        second.close()
        first.close()


def test_concurrent_first_start_migrates_once(pg_url: str) -> None:
    """Many workers starting at once on an empty PostgreSQL: one migrates, the others wait and see head."""
    errors: list[BaseException] = []
    stores: list[ResultStore] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(timeout=30)
            s = ResultStore(pg_url)
            with lock:
                stores.append(s)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    _run_threads(*[start] * 4)
    try:
        assert not errors, errors
        assert len(stores) == 4
        with stores[0].engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        stores[0].create_run(_spec(), GROUPS)
    finally:
        for s in stores:
            s.close()


def test_stale_leases_are_released_to_exactly_one_caller(db_url: str) -> None:
    a, b = ResultStore(db_url), ResultStore(db_url)  # two worker hosts' reclaimers
    try:
        run_id = a.create_run(_spec(), GROUPS, farm=True)
        keys = _all_keys(a, run_id)
        dead, alive, finished = keys[:4], keys[4:6], keys[6:]
        a.lease(dead, "dead-worker", -5)  # already expired: the worker died
        a.lease(alive, "live-worker", 600)
        a.lease(finished, "live-worker", -5)
        a.record_results([_ok(k) for k in finished], "live-worker")  # done rows are never stale

        stale = a.stale_leases()
        assert sorted(it.key for it in stale) == sorted(dead)
        assert all(isinstance(it, WorkItem) and it.rel_path for it in stale)
        assert sorted(it.key for it in b.stale_leases()) == sorted(dead)

        won: dict[str, list[WorkItem]] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def claim(name: str, store: ResultStore) -> None:
            try:
                barrier.wait(timeout=30)
                won[name] = release(store, stale, 600)
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

        _run_threads(lambda: claim("a", a), lambda: claim("b", b))
        assert not errors, errors
        got_a = {it.key for it in won["a"]}
        got_b = {it.key for it in won["b"]}
        assert not got_a & got_b, "an expired image was re-enqueued by two callers"
        assert got_a | got_b == set(dead)
        # Re-armed: no longer stale, still leased (a worker will pick the re-enqueued message up).
        assert a.stale_leases() == [] and release(b, stale, 600) == []
        status = {(r["group_position"], r["image_index"]): r["status"] for r in image_rows(a, run_id)}
        assert all(status[(k.group_position, k.image_index)] == LEASED for k in dead + alive)
    finally:
        a.close()
        b.close()


def _run_threads(*fns: Callable[[], None]) -> None:
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a store call hung"
