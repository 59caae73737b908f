"""Enqueue hygiene (issue 18, items 8-10), on real PostgreSQL and Redis: a cancelled run is never
queued or resumed again; a farm run never goes to an SQLite store; every message names its store and
a worker on another store refuses it without touching its own run of the same id; the same enqueue
twice queues the work once (and of two racing ones only one registers a run)."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL
from support.cli import base_env, cli, cli_popen
from support.db import pg_database
from support.farm import MISSION, Farm, farm_factory, make_tree, wait_for  # noqa: F401
from support.queues import clear, payload_keys, queued_raw
from support.store import dead_letters, image_rows
from test_cli_errors import assert_one_line_error

from stage_a.config import GenerationParams, RunSpec
from stage_a.settings import Settings
from stage_a.store import ResultStore, utcnow
from stage_a.work import ImageKey, ImageResult


@pytest.fixture()
def queue() -> Iterator[str]:
    """A queue of its own on the shared Redis, deleted afterwards."""
    import redis

    name = f"stage_a_hyg_{uuid.uuid4().hex[:8]}"
    yield name
    clear(redis.Redis.from_url(REDIS_URL), name)


def _images(queue: str) -> int:
    """Images carried by the messages waiting on ``queue`` and its per-model queues."""
    return sum(len(payload_keys(p)) for p in _payloads(queue))


def _payloads(queue: str) -> list[dict[str, Any]]:
    """The task payloads waiting on ``queue`` and its per-model queues (kombu envelopes of Celery protocol-2
    messages)."""
    import redis

    out = []
    for raw in queued_raw(redis.Redis.from_url(REDIS_URL), queue):
        envelope = json.loads(raw)
        out.append(json.loads(base64.b64decode(envelope["body"]))[0][0])
    return out


def _env(queue: str, tmp_path: Path, db: str | None = None, **extra: str) -> dict[str, str]:
    if db:
        extra["STAGE_A_DATABASE_URL"] = db
    return base_env(STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=queue, STAGE_A_CACHE_DIR=str(tmp_path / "cache"),
                    **extra)


def _enqueue(tree: Path, *extra: str) -> list[str]:
    return ["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--max-new-tokens", "4",
            "--sharding-mode", "per_image", *extra]


def _ok(proc: subprocess.CompletedProcess[str]) -> int:
    """The run id a successful enqueue printed."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.rsplit("run_id=", 1)[1].split()[0])


def _latest(db_url: str) -> int:
    store = ResultStore(db_url)
    try:
        latest = store.latest_run()
        return latest.id if latest else 0
    finally:
        store.close()


# ---- item 8: a cancelled run stays cancelled -------------------------------------------------


def test_a_cancelled_run_is_neither_re_enqueued_nor_resumed(pg_url: str, queue: str, tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=3, per_group=2)
    env = _env(queue, tmp_path, pg_url)
    run_id = _ok(cli(_enqueue(tree), env, tmp_path))
    cancel = cli(["cancel", str(run_id)], env, tmp_path)
    assert cancel.returncode == 0 and "6 queued images removed" in cancel.stdout, cancel.stdout + cancel.stderr

    again = cli(["enqueue", "--run", str(run_id)], env, tmp_path)
    assert again.returncode == 2
    assert_one_line_error(again, f"run {run_id} was cancelled at 20", "UTC", "cannot be re-enqueued")
    assert _payloads(queue) == []

    out = tmp_path / "out"
    resumed = cli(["run", "--resume", "--run", str(run_id), "--db", pg_url, "--output-dir", str(out),
                   "--device", "cpu"], env, tmp_path)
    assert resumed.returncode == 2
    assert_one_line_error(resumed, f"run {run_id} was cancelled at 20", "cannot be resumed")
    assert not out.exists()
    store = ResultStore(pg_url)
    assert {r["status"] for r in image_rows(store, run_id)} == {"pending"}  # nothing was run
    store.close()


# ---- item 9: a farm run on SQLite is refused ---------------------------------------------------


@pytest.mark.parametrize("form", ["--db path", "--db url", "env url"])
def test_a_farm_run_on_sqlite_is_refused_before_anything_is_recorded(queue: str, tmp_path: Path, form: str) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2)
    db = tmp_path / "results.sqlite"
    args = {"--db path": ["--db", str(db)], "--db url": ["--db", f"sqlite:///{db}"], "env url": []}[form]
    env = _env(queue, tmp_path, f"sqlite:///{db}" if form == "env url" else None)
    proc = cli(_enqueue(tree, *args), env, tmp_path)
    assert proc.returncode == 2
    line = assert_one_line_error(proc, str(db), "workers on other hosts cannot share an SQLite file", "PostgreSQL")
    assert line.startswith("stage-a: error: " + ("STAGE_A_DATABASE_URL" if form == "env url" else "--db")), line
    assert not db.exists() and _payloads(queue) == []

    dry = cli(_enqueue(tree, *args, "--dry-run"), env, tmp_path)
    assert dry.returncode == 2, dry.stdout + dry.stderr  # the real command would fail
    problems = [ln for ln in dry.stdout.splitlines() if ln.strip().startswith("problem:")]
    assert len(problems) == 1 and "workers on other hosts cannot share an SQLite file" in problems[0], dry.stdout
    assert not db.exists() and _payloads(queue) == []


# ---- item 9: every message names its store ----------------------------------------------------


def _register(db_url: str, tree: Path, checkpoint: Path) -> int:
    from producer.register import register_run

    store = ResultStore(db_url)
    try:
        spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", checkpoint=str(checkpoint), batch_size=4,
                       sharding_mode="per_image", generation=GenerationParams(max_new_tokens=4))
        return register_run(store, spec, tree, farm=True).run_id
    finally:
        store.close()


def _foreign_reason(a_url: str, b_url: str) -> str:
    a, b = ResultStore(a_url), ResultStore(b_url)
    try:
        return (f"message from store {a.store_id}, this worker's store is {b.store_id}: "
                f"enqueued with another --db/STAGE_A_DATABASE_URL")
    finally:
        a.close()
        b.close()


def test_admission_refuses_another_stores_message_and_accepts_one_naming_no_store(
        pg_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from stage_a.messages import image_payload
    from workers.admission import Admission

    make_tree(tmp_path / "in", groups=2, per_group=2)
    with pg_database() as other_url:
        assert _register(pg_url, tmp_path / "in", tiny_checkpoint) == _register(other_url, tmp_path / "in",
                                                                                tiny_checkpoint) == 1
        other = ResultStore(other_url)
        item = other.unfinished_items(1)[0]
        foreign = image_payload(item, other.store_id)
        other.close()
        store = ResultStore(pg_url)
        try:
            admission = Admission(store, Settings(database_url=pg_url), "w")
            admitted = admission.admit([foreign])
            reason = _foreign_reason(other_url, pg_url)
            assert admitted.dead == 1 and admitted.work == {} and not admitted.handed_back
            assert [(f.kind, f.run_id, f.reason) for f in admitted.messages] == [("rejected", None, reason)]
            assert [r for r, _ in dead_letters(store)] == [reason]
            with store.engine.connect() as c:  # the dead letter names no run of this store
                assert c.exec_driver_sql("SELECT run_id FROM dead_letters").scalar() is None
            assert {(r["status"], r["attempts"]) for r in image_rows(store, 1)} == {("pending", 0)}
            # A message queued before messages named their store is still work.
            legacy = {k: v for k, v in foreign.items() if k != "store"}
            assert admission.admit([legacy]).work == {1: [item]}
        finally:
            store.close()


@pytest.mark.slow
def test_a_worker_refuses_messages_enqueued_against_another_store(pg_url: str, farm_factory, tmp_path: Path,  # noqa: F811
                                                                  tiny_checkpoint: Path) -> None:
    """A real worker on store B; `stage-a enqueue` against store A on the same broker and queue. B has a run
    of the same id and the same images: without the store in the message the worker would serve A's
    messages as B's run."""
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_ORPHAN_GRACE="3600")  # B's run has no messages: never re-sent
    b_run = _register(pg_url, tmp_path / "in", tiny_checkpoint)
    worker = farm.worker("b")
    with pg_database() as a_url:
        env = dict(farm.env(), STAGE_A_DATABASE_URL=a_url)
        a_run = _ok(cli(_enqueue(tmp_path / "in", "--checkpoint", str(tiny_checkpoint), "--batch-size", "1"),
                        env, tmp_path))
        assert a_run == b_run == 1
        store = farm.store()
        try:
            wait_for(lambda: len(dead_letters(store)) >= 4 and farm.redis.queued(farm.queue) == 0
                     and farm.redis.unacked() == 0, 120, "the 4 messages to be refused", on_timeout=farm.logs)
            reason = _foreign_reason(a_url, pg_url)
            assert [r for r, _ in dead_letters(store)] == [reason] * 4
            with store.engine.connect() as c:
                assert c.exec_driver_sql("SELECT count(*) FROM dead_letters WHERE run_id IS NULL").scalar() == 4
            assert {(r["status"], r["attempts"], r["worker"]) for r in image_rows(store, b_run)} == {("pending", 0, None)}
            assert store.get_run(b_run).cancelled_at is None
        finally:
            store.close()
        a = ResultStore(a_url)
        assert {r["status"] for r in image_rows(a, a_run)} == {"pending"}
        a.close()
    worker.assert_alive()


def test_every_sender_names_the_store(pg_url: str, queue: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """enqueue's publisher and the reclaimer put the store id in every message."""
    from workers.reclaimer import Reclaimer

    make_tree(tmp_path / "in", groups=2, per_group=2)
    env = _env(queue, tmp_path, pg_url)
    _ok(cli(_enqueue(tmp_path / "in", "--checkpoint", str(tiny_checkpoint)), env, tmp_path))
    _ok(cli(_enqueue(tmp_path / "in", "--checkpoint", str(tiny_checkpoint), "--sharding-mode", "per_group"), env,
            tmp_path))
    store = ResultStore(pg_url)
    try:
        sent = _payloads(queue)
        assert sum(len(payload_keys(p)) for p in sent) == 4 + 4 and {p["store"] for p in sent} == {store.store_id}
        import redis

        clear(redis.Redis.from_url(REDIS_URL), queue)  # the messages are lost: the reclaimer re-sends
        settings = Settings(broker_url=REDIS_URL, database_url=pg_url, queue=queue, orphan_grace=1)
        report = Reclaimer(settings, store, clock=lambda: utcnow() + timedelta(seconds=60)).once()
        assert report.orphaned == 8
        assert {p["store"] for p in _payloads(queue)} == {store.store_id}
    finally:
        store.close()


def test_cancel_drops_only_its_own_stores_messages(queue: str) -> None:
    from producer.publish import Publisher
    from stage_a.messages import image_payload
    from stage_a.work import WorkItem

    a, b = "a" * 32, "b" * 32
    one, two = WorkItem(ImageKey(1, 0, 1), "x.jpg"), WorkItem(ImageKey(2, 0, 1), "y.jpg")
    legacy = {k: v for k, v in image_payload(one, a).items() if k != "store"}
    publisher = Publisher(Settings(broker_url=REDIS_URL, queue=queue))
    publisher.publish([image_payload(one, a), image_payload(one, b), legacy, image_payload(two, a),
                       image_payload(one, a), image_payload(one, b)])
    assert publisher.drop_run(1, a) == 3
    left = _payloads(queue)
    assert sorted((p.get("store"), p["run_id"]) for p in left) == [(a, 2), (b, 1), (b, 1)]


# ---- item 10: the same enqueue twice -----------------------------------------------------------


def _finish(db_url: str, run_id: int, n: int | None = None) -> None:
    """Record ``n`` (default: all) of the run's unfinished images as done."""
    store = ResultStore(db_url)
    try:
        items = store.unfinished_items(run_id)[:n]
        store.record_results([ImageResult(it.key, summary="无关图片") for it in items], "w")
    finally:
        store.close()


def test_the_same_enqueue_twice_queues_the_work_once(pg_url: str, queue: str, tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=3, per_group=2)
    env = _env(queue, tmp_path, pg_url)
    args = _enqueue(tree, "--checkpoint", str(tiny_checkpoint))
    assert _ok(cli(args, env, tmp_path)) == 1
    _finish(pg_url, 1, 2)

    def twin_of(proc: subprocess.CompletedProcess[str], run_id: int, done: int) -> None:
        assert _ok(proc) == run_id
        assert proc.stdout.splitlines() == [
            f"run {run_id} has the same inputs and is unfinished ({done} of 6 done); nothing queued "
            f"(pass --new-run to start another)", f"run_id={run_id}"], proc.stdout
        assert proc.stderr == "", proc.stderr

    twin_of(cli(args, env, tmp_path), 1, 2)
    # The same root given as its mission folder, relative to another cwd, with a cosmetic option: the same.
    twin_of(cli(_enqueue(Path("in") / MISSION, "--checkpoint", str(tiny_checkpoint), "--verify-inputs"), env,
                tmp_path), 1, 2)
    assert _images(queue) == 6 and _latest(pg_url) == 1
    # What changes the output is another run; so is --new-run.
    assert _ok(cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "5"), env, tmp_path)) == 2
    assert _ok(cli(_enqueue(tree, "--checkpoint", str(tiny_checkpoint), "--sample-seed", "7"), env, tmp_path)) == 3
    assert _ok(cli([*args, "--new-run"], env, tmp_path)) == 4
    assert _images(queue) == 4 * 6
    twin_of(cli(args, env, tmp_path), 4, 0)  # the newest unfinished twin
    # A finished or cancelled twin does not block.
    _finish(pg_url, 1)
    _finish(pg_url, 4)
    assert _ok(cli(args, env, tmp_path)) == 5
    store = ResultStore(pg_url)
    store.cancel_run(5)
    store.close()
    assert _ok(cli(args, env, tmp_path)) == 6


def test_of_two_racing_identical_enqueues_one_registers_the_run(pg_url: str, queue: str, tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    """Both enqueues wait on the advisory lock of their inputs_key (held here); released, one registers
    the run and the other finds it."""
    import redis
    from sqlalchemy import create_engine, text

    from stage_a.store.store import inputs_lock

    tree = tmp_path / "in"
    make_tree(tree, groups=3, per_group=2)
    env = _env(queue, tmp_path, pg_url)
    args = _enqueue(tree, "--checkpoint", str(tiny_checkpoint))
    assert _ok(cli(args, env, tmp_path)) == 1  # only to learn the key: cancelled, it blocks nothing
    store = ResultStore(pg_url)
    store.cancel_run(1)
    with store.engine.connect() as c:
        key = c.exec_driver_sql("SELECT inputs_key FROM runs WHERE id = 1").scalar()
    store.close()
    clear(redis.Redis.from_url(REDIS_URL), queue)

    engine = create_engine(pg_url)
    holder = engine.connect()
    waiting = text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                   "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        space, lock = inputs_lock(key)
        holder.execute(text("SELECT pg_advisory_lock(:s, :k)"), {"s": space, "k": lock})
        procs = [cli_popen(args, env, tmp_path, tmp_path / f"enqueue{i}.log") for i in range(2)]
        with engine.connect() as c:
            wait_for(lambda: c.execute(waiting).scalar() == 2 or any(p.poll() is not None for p in procs), 60,
                     "both enqueues to wait on the lock")
            assert c.execute(waiting).scalar() == 2, [(tmp_path / f"enqueue{i}.log").read_text() for i in range(2)]
        holder.execute(text("SELECT pg_advisory_unlock(:s, :k)"), {"s": space, "k": lock})
        for p in procs:
            assert p.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.close()
        engine.dispose()
    logs = [(tmp_path / f"enqueue{i}.log").read_text() for i in range(2)]
    assert sorted("image tasks queued" in log for log in logs) == [False, True], logs
    assert sum("has the same inputs and is unfinished (0 of 6 done)" in log for log in logs) == 1, logs
    assert all("run_id=2" in log for log in logs), logs
    assert _latest(pg_url) == 2 and _images(queue) == 6
