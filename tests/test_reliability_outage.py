"""Infrastructure faults are never the message's fault.

PostgreSQL out of connections (the worker's role gets CONNECTION LIMIT 0 and its connections are
terminated: every reconnect fails with "too many connections for role") at intake, or while a
buffer's results are being stored: the messages are re-queued after a back-off, no dead letter is
written, and the images are done once the database is back. A reclaimer that keeps failing says
so in `stage-a status`.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import base_env, cli
from support.db import RoleDatabase, pg_role_database
from support.farm import MISSION, Farm, RedisServer, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import dead_letters, image_rows

from stage_a.config import GenerationParams, RunSpec
from stage_a.messages import image_payload
from stage_a.settings import Settings
from stage_a.store import ResultStore
from workers.runtime import WorkerRuntime


@pytest.fixture()
def role_db() -> Iterator[RoleDatabase]:
    with pg_role_database() as db:
        ResultStore(db.url).close()  # the schema is the role's (the admin only reads and registers)
        yield db


def _register(db_url: str, input_dir: Path, checkpoint: Path) -> tuple[int, list[dict[str, Any]], str]:
    """The run id, its messages' payloads and its model's queue suffix (the route)."""
    from producer.register import register_run

    store = ResultStore(db_url)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", batch_size=4, checkpoint=str(checkpoint),
                   generation=GenerationParams(max_new_tokens=4))
    reg = register_run(store, spec, input_dir, farm=True)
    payloads = [image_payload(it, store.store_id) for it in store.unfinished_items(reg.run_id)]
    store.close()
    return reg.run_id, payloads, reg.route


def _runtime(db: RoleDatabase, redis: RedisServer, queue: str, checkpoint: Path) -> WorkerRuntime:
    settings = Settings(database_url=db.url, broker_url=redis.url, queue=queue, device="cpu",
                        checkpoint=str(checkpoint))
    return WorkerRuntime(settings, name="outage-worker:1")


def _queued_payloads(redis: RedisServer, queue: str) -> list[dict[str, Any]]:
    import base64

    raws = redis.client().lrange(queue, 0, -1)  # exactly this queue
    return [json.loads(base64.b64decode(json.loads(r)["body"]))[0][0] for r in reversed(raws)]


def test_dropped_database_at_intake_requeues_the_buffer_and_writes_no_dead_letter(
        role_db: RoleDatabase, redis: RedisServer, tiny_checkpoint: Path, tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1, per_group=2)
    run_id, payloads, route = _register(role_db.admin_url, tmp_path / "in", tiny_checkpoint)
    queue = f"outage_{uuid.uuid4().hex[:8]}"
    model_queue = f"{queue}.{route}"
    rt = _runtime(role_db, redis, queue, tiny_checkpoint)
    waits: list[float] = []

    def back_off(seconds: float) -> None:  # the outage ends while the worker backs off
        waits.append(seconds)
        role_db.unblock()

    rt.sleep = back_off
    role_db.block()  # out of connections: the worker's next query cannot connect
    processed = rt.process(payloads, [model_queue] * len(payloads))  # as delivered from the model's queue
    assert [o.kind for o in processed.outcomes] == ["redelivered", "redelivered"]
    assert "too many connections" in (processed.outcomes[0].reason or "")
    assert waits == [1.0]
    admin = ResultStore(role_db.admin_url)
    try:
        assert dead_letters(admin) == []
        # The same messages, back on the queue they came from, to be delivered again.
        assert _queued_payloads(redis, model_queue) == payloads
        assert {(r["status"], r["attempts"]) for r in image_rows(admin, run_id)} == {("pending", 0)}

        again = rt.process(_queued_payloads(redis, model_queue))  # the next delivery, the database back
        assert [o.kind for o in again.outcomes] == ["done", "done"]
        assert {r["status"] for r in image_rows(admin, run_id)} == {"done"}
        assert dead_letters(admin) == []
    finally:
        admin.close()
        rt.store.close()


def test_database_lost_while_storing_results_requeues_what_is_not_committed(
        role_db: RoleDatabase, redis: RedisServer, tiny_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch ran, its results cannot be stored (the store's retry gives up): the messages are
    re-queued at once rather than left leased for STAGE_A_LEASE_SECONDS."""
    import stage_a.store.store as store_module
    from stage_a.store.engine import retrying

    make_tree(tmp_path / "in", groups=1, per_group=2)
    run_id, payloads, route = _register(role_db.admin_url, tmp_path / "in", tiny_checkpoint)
    queue = f"outage_{uuid.uuid4().hex[:8]}"
    model_queue = f"{queue}.{route}"
    rt = _runtime(role_db, redis, queue, tiny_checkpoint)
    rt.sleep = lambda s: role_db.unblock()
    # The store's retry gives up after 2 quick attempts (its 8 with back-off would take ~30 s).
    monkeypatch.setattr(store_module, "retrying", functools.partial(retrying, attempts=2, base_delay=0.01))
    original = rt.store.record_results

    def record_during_outage(*args: Any, **kwargs: Any) -> None:
        role_db.block()  # the database goes away just as the batch's results are written
        original(*args, **kwargs)

    rt.store.record_results = record_during_outage  # type: ignore[method-assign]
    processed = rt.process(payloads)  # no source queue known: the queue of the run's model
    assert [o.kind for o in processed.outcomes] == ["redelivered", "redelivered"]
    rt.store.record_results = original  # type: ignore[method-assign]
    admin = ResultStore(role_db.admin_url)
    try:
        assert dead_letters(admin) == []
        assert _queued_payloads(redis, model_queue) == payloads
        assert {r["status"] for r in image_rows(admin, run_id)} == {"leased"}  # nothing was stored
        again = rt.process(_queued_payloads(redis, model_queue))
        assert [o.kind for o in again.outcomes] == ["done", "done"]
        assert {(r["status"], r["attempts"]) for r in image_rows(admin, run_id)} == {("done", 2)}
    finally:
        admin.close()
        rt.store.close()


@pytest.mark.slow
def test_worker_out_of_database_connections_at_intake_leaves_no_dead_letter(
        role_db: RoleDatabase, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    """A real worker: its role is out of connections when the run's messages arrive. The orphan
    reclaimer is kept out of it (an hour's grace): only the worker's re-queue can finish the run."""
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(role_db.url, STAGE_A_ORPHAN_GRACE="3600")
    w = farm.worker("o")
    wait_for(w.ready, 90, "the worker ready", on_timeout=farm.logs)
    role_db.block()
    enqueue = cli(["enqueue", "--mission", MISSION, "--input-dir", str(tmp_path / "in"), "--max-new-tokens", "4",
                   "--batch-size", "4", "--checkpoint", str(farm.checkpoint)],
                  {**farm.env(), "STAGE_A_DATABASE_URL": role_db.admin_url}, tmp_path, timeout=120)
    assert enqueue.returncode == 0, enqueue.stdout + enqueue.stderr
    run_id = int(enqueue.stdout.rsplit("run_id=", 1)[1].split()[0])

    def met_the_outage() -> bool:  # re-queued now; before this change, dead-lettered
        log = w.log()
        return "re-queuing" in log or "rejected message" in log

    wait_for(met_the_outage, 60, "the worker to take the buffer during the outage", 0.1, on_timeout=farm.logs)
    role_db.unblock()
    admin = ResultStore(role_db.admin_url)
    try:
        counts = farm.wait_finished(run_id, 90)
        assert counts.done == 4 and counts.failed == 0
        assert dead_letters(admin) == []
        assert "unreadable message" not in w.log() and "too many connections" in w.log()
    finally:
        admin.close()


def test_failing_reclaimer_is_named_by_status_until_a_pass_succeeds(pg_url: str, tmp_path: Path) -> None:
    from stage_a.store import GroupInput

    store = ResultStore(pg_url)
    groups = [GroupInput("QC-RCL-20240101-0000001", "pass", ("x/a.jpg", "x/b.jpg"))]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups, farm=True)
    store.lease([it.key for it in store.unfinished_items(run_id)], "dead-worker", -60)
    store.close()
    redis = RedisServer(tmp_path, password="s3cret-pw")  # not started: the broker is down
    env = base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=redis.url, STAGE_A_QUEUE="stage_a_rclm")
    try:
        down = cli(["reclaim"], env, tmp_path, timeout=120)
        assert down.returncode != 0
        status = cli(["status", str(run_id)], env, tmp_path, timeout=120)
        line = next((ln for ln in status.stdout.splitlines() if ln.startswith("reclaimer on ")), "")
        assert " failing since " in line and f"127.0.0.1:{redis.port}" in line, status.stdout
        js = json.loads(cli(["status", str(run_id), "--json"], env, tmp_path, timeout=120).stdout)
        [failing] = js["reclaimers_failing"]
        assert failing["failing_since"] and f"127.0.0.1:{redis.port}" in failing["problem"]
        assert "s3cret" not in status.stdout + json.dumps(js) + down.stdout + down.stderr

        redis.start()
        up = cli(["reclaim"], env, tmp_path, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        after = cli(["status", str(run_id)], env, tmp_path, timeout=120)
        assert "reclaimer on " not in after.stdout, after.stdout
    finally:
        redis.kill()
