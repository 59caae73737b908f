"""The run counters (kept by triggers, revision 0006) equal a full count after every write path, on
SQLite and PostgreSQL, and under concurrent writers of one run on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text
from support.counts import assert_counters_exact, counter_mismatches
from support.store import release

from stage_a.config import GenerationParams, RunSpec
from stage_a.store import GroupInput, ResultStore
from stage_a.store.models import utcnow
from stage_a.work import ImageKey, ImageResult, WorkItem

MISSION = "挡风板安装检查"



def _spec() -> RunSpec:
    return RunSpec(mission=MISSION, dataset="bbu", input_root="/data/in", checkpoint="/models/x",
                   sharding_mode="per_image", batch_size=4, generation=GenerationParams(max_new_tokens=16))


def _groups(n: int, per: int) -> list[GroupInput]:
    return [GroupInput(f"QC-T-20240101-{g:07d}", "fail" if g % 3 == 0 else "pass",
                       tuple(f"{MISSION}/g{g}/{i}.jpg" for i in range(per))) for g in range(n)]


def _result(key: ImageKey, ok: bool = True, tokens: int | None = 3) -> ImageResult:
    return ImageResult(key=key, summary='{"统计": []}' if ok else None, raw_text="x", error=None if ok else "boom",
                       prompt_tokens=10, completion_tokens=tokens, vision_tokens=4, preprocess_ms=1.5,
                       generate_ms=2.25 + key.image_index)


def _keys(run_id: int, groups: list[GroupInput]) -> list[ImageKey]:
    return [ImageKey(run_id, p, i) for p, g in enumerate(groups) for i in range(1, len(g.images) + 1)]


def test_every_write_path_keeps_counters_exact(store: ResultStore) -> None:
    groups = _groups(7, 3)
    run = store.create_run(_spec(), groups, farm=True)
    other = store.create_run(_spec(), _groups(2, 2), farm=True)  # never touched: must stay as registered
    keys = _keys(run, groups)
    check = lambda: assert_counters_exact(store.engine)  # noqa: E731
    check()
    c = store.queries.counts(run)
    assert (c.pending, c.groups_done, c.groups_total) == (21, 0, 7)

    store.lease(keys[:12], "w1:1", 60)
    check()
    store.record_results([_result(k) for k in keys[:6]], "w1:1", model="m-a", engine="transformers")
    store.record_results([_result(k, ok=False) for k in keys[6:8]], "w1:1", model="m-a", engine="transformers")
    store.record_results([_result(k, tokens=None) for k in keys[8:10]], "w2:1", model="m-b", engine="vllm")
    check()
    c = store.queries.counts(run)
    assert (c.done, c.failed, c.leased, c.pending) == (8, 2, 2, 9)
    assert (c.groups_done, c.groups_failed) == (2, 1)  # groups 0 and 1 done; group 2 has the failures
    assert {(m.model, m.engine, m.images) for m in c.models} == {("m-a", "transformers", 6), ("m-b", "vllm", 2)}
    assert set(c.workers) == {"w1:1", "w2:1"}

    store.record_results([_result(k) for k in keys[:2]], "w9:1", model="m-z")  # a duplicate: done stays done
    store.unlease(keys[10:12])
    check()
    store.lease(keys[12:15], "w3:1", -1)  # expired at once
    won = release(store, [WorkItem(k, "p") for k in keys[12:15]], 60)
    assert len(won) == 3
    check()
    store.heartbeat("w3:1", "stopped")
    items = store.dead_holder_leases(holder_timeout=60)
    with store.releasing_dead_holders(items, holder_timeout=60) as back:
        assert back
    check()
    later = utcnow() + timedelta(hours=1)
    orphans = store.orphaned_pending(grace_seconds=1, now=later)
    with store.claiming_orphans(orphans, grace_seconds=1, now=later):
        pass
    check()
    assert store.reset_failed(run) == 2
    check()
    c = store.queries.counts(run)
    assert (c.failed, c.groups_failed) == (0, 0)
    store.lease(keys, "w4:1", 60)
    store.record_results([_result(k, ok=k.image_index != 2) for k in keys], "w4:1", model="m-a", engine="transformers")
    check()
    c = store.queries.counts(run)
    # groups 0 and 1 were done before (a done row stays done); every other group has one failure
    assert c.finished and (c.done, c.failed, c.groups_done, c.groups_failed) == (16, 5, 2, 5)
    assert store.queries.counts(other).pending == 4
    assert store.queries.status_counts([run, other])[other] == {"pending": 4}
    assert store.queries.unfinished_run_ids() == [other]


def test_inserted_rows_carrying_results_move_every_counter(store: ResultStore) -> None:
    """Registration's plain pending rows take PostgreSQL's shortcut (revision 0008); one statement that also
    inserts a finished row, or a pending row already holding a worker, takes the general path."""
    groups = _groups(3, 2)
    run = store.create_run(_spec(), groups[:1], farm=True)
    assert store.queries.counts(run).pending == 2
    with store.engine.begin() as c:
        c.execute(text("INSERT INTO groups (run_id, position, group_id, label, n_images, n_done, n_failed) "
                       "VALUES (:r, 1, 'g1', 'pass', 2, 0, 0), (:r, 2, 'g2', 'pass', 2, 0, 0)"), {"r": run})
        insert = ("INSERT INTO images (run_id, group_position, image_index, rel_path, status, attempts, summary, "
                  "generate_ms, completion_tokens, worker, model, engine, updated_at) VALUES ")
        c.execute(text(insert + "(:r, 1, 1, 'a.jpg', 'pending', 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL), "
                       "(:r, 2, 1, 'c.jpg', 'pending', 0, NULL, NULL, NULL, 'w:2', NULL, NULL, NULL)"), {"r": run})
        c.execute(text(insert + "(:r, 1, 2, 'b.jpg', 'done', 1, 's', 5.0, 7, 'w:1', 'm-a', 'vllm', :now)"),
                  {"r": run, "now": utcnow()})
    assert_counters_exact(store.engine)
    c = store.queries.counts(run)
    assert (c.pending, c.done, c.completion_tokens) == (4, 1, 7)
    assert {(m.model, m.engine, m.images) for m in c.models} == {("m-a", "vllm", 1)}
    assert set(c.workers) == {"w:1", "w:2"}


def test_recent_window_counts_results_after_since(store: ResultStore) -> None:
    groups = _groups(2, 2)
    run = store.create_run(_spec(), groups)
    keys = _keys(run, groups)
    store.record_results([_result(k) for k in keys[:3]], "w:1")
    assert store.queries.counts(run, since=utcnow() - timedelta(seconds=60)).finished_since == 3
    assert store.queries.counts(run, since=utcnow() + timedelta(seconds=30)).finished_since == 0


def test_counters_catch_a_write_that_bypasses_them(store: ResultStore) -> None:
    """The check bites: a row changed with the triggers dropped leaves the counters wrong and named."""
    groups = _groups(2, 2)
    run = store.create_run(_spec(), groups)
    pg = store.engine.dialect.name == "postgresql"
    with store.engine.begin() as c:
        c.execute(text("DROP TRIGGER images_update_counts" + (" ON images" if pg else "")))
        c.execute(text("UPDATE images SET status = 'done' WHERE run_id = :r AND group_position = 0"), {"r": run})
    problems = counter_mismatches(store.engine, run)
    assert any(p.startswith("done:") for p in problems) and any("group counters wrong" in p for p in problems)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_concurrent_writers_of_one_run_keep_counters_exact(pg_url: str, backend: str) -> None:
    """Eight writers record interleaved images of the same groups at once: no deadlock, exact counts."""
    store = ResultStore(pg_url)
    groups = _groups(40, 4)
    run = store.create_run(_spec(), groups, farm=True)
    keys = _keys(run, groups)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            own = ResultStore(pg_url, migrate=False)
            mine = keys[n::8]
            for lo in range(0, len(mine), 5):
                chunk = mine[lo:lo + 5][::-1] if n % 2 else mine[lo:lo + 5]
                own.lease(chunk, f"w{n}:1", 60)
                own.record_results([_result(k, ok=(k.image_index + n) % 5 != 0) for k in chunk], f"w{n}:1", model="m")
            own.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert_counters_exact(store.engine, [run])
    c = store.queries.counts(run)
    assert c.done + c.failed == len(keys) and c.finished
    store.close()


def test_deleting_a_run_deletes_its_groups_and_images(store: ResultStore) -> None:
    """A run deleted by hand (DELETE FROM runs) takes its groups and images with it, and no other run's: a
    foreign key's cascade on SQLite, a statement trigger on PostgreSQL (revision 0007 dropped that key)."""
    keep = store.create_run(_spec(), _groups(4, 2), farm=True)
    gone = store.create_run(_spec(), _groups(5, 3), farm=True)
    store.record_results([_result(ImageKey(gone, 0, 0))], "w", "m", "transformers")
    with store.engine.begin() as c:
        c.execute(text("DELETE FROM runs WHERE id = :r"), {"r": gone})
    with store.engine.connect() as c:
        left = dict(c.execute(text("SELECT run_id, count(*) FROM images GROUP BY run_id")).all())
        groups = dict(c.execute(text("SELECT run_id, count(*) FROM groups GROUP BY run_id")).all())
    assert left == {keep: 8} and groups == {keep: 4}
