"""The farm end to end: real Redis, real PostgreSQL, two Celery workers started as an operator starts them.

`stage-a enqueue` + two `celery -A workers worker` processes + `stage-a export` must give the JSONL of
`stage-a run` byte for byte, in both sharding modes, with every image summarized exactly once.
The enqueue/status/export behaviour on unfinished runs is checked without workers (a queue nobody reads).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from support.cli import base_env, cli
from support.db import PG_ADMIN_URL, pg_database  # noqa: F401  (PG_ADMIN_URL: re-exported)
from support.farm import Worker
from support.queues import clear, payload_keys, queued_raw
from support.runreport import check_report
from support.store import image_rows, store_id_of

from producer.sample_data import make_sample_tree

pytestmark = pytest.mark.slow

MISSION = "挡风板安装检查"
JSONL = f"{MISSION}_stage_a.jsonl"
FAILURES = f"{MISSION}_stage_a_failures.jsonl"
REPORT = f"{MISSION}_stage_a_report.json"
# Redis DB used only by this module (queue names are unique per test as well, so concurrent sessions
# on the same server never read each other's messages); cleaned key by key, never flushed.
REDIS_DB = int(os.environ.get("STAGE_A_TEST_FARM_REDIS_DB", "13"))
FINISH_DEADLINE_S = 240.0
WORKER_READY_DEADLINE_S = 120.0


def redis_url() -> str:
    base = urlsplit(os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit(base._replace(path=f"/{REDIS_DB}"))


# ---- helpers ------------------------------------------------------------------------------------


def cli_env(tmp: Path, queue: str, db_url: str, **extra: str) -> dict[str, str]:
    return base_env(STAGE_A_BROKER_URL=redis_url(), STAGE_A_QUEUE=queue, STAGE_A_DATABASE_URL=db_url,
                    STAGE_A_CACHE_DIR=str(tmp / "cache"), **extra)


stage_a = cli


def enqueue_args(tree: Path, checkpoint: Path, mode: str) -> list[str]:
    return ["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(checkpoint),
            "--max-new-tokens", "12", "--batch-size", "3", "--sharding-mode", mode,
            "--no-reuse"]  # each run generates (reuse has its own farm test, tests/test_reuse.py)


def run_id_of(proc: subprocess.CompletedProcess[str]) -> int:
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"^run_id=(\d+)$", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    return int(m.group(1))


def redis_client():  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(redis_url())


def queued_payloads(queue: str) -> list[dict[str, Any]]:
    """The task payloads waiting on ``queue`` in delivery order, decoded from kombu's JSON envelope."""
    out = []
    for raw in queued_raw(redis_client(), queue):  # the queue and its per-model queues
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"  # JSON only, never pickle
        assert envelope["headers"]["task"] == "stage_a.summarize"
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        assert kwargs == {} and len(args) == 1
        out.append(args[0])
    return out


def clean_redis(*tokens: str) -> None:
    """Remove every key, binding and unacked entry of this test's queues/workers; leave the rest alone."""
    r = redis_client()
    for key in r.scan_iter(count=1000):
        name = key.decode(errors="replace")
        if any(t in name for t in tokens):
            r.delete(key)
        elif name.startswith("_kombu.binding."):
            stale = [m for m in r.smembers(key) if any(t in m.decode(errors="replace") for t in tokens)]
            if stale:
                r.srem(key, *stale)
    for tag, value in r.hgetall("unacked").items():
        if any(t in value.decode(errors="replace") for t in tokens):
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)


@pytest.fixture()
def queue() -> Iterator[str]:
    name = f"stage_a_test_{uuid.uuid4().hex[:10]}"
    yield name
    clean_redis(name)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 5 groups (one group id resubmitted under both labels), 12 images of different sizes.
    return make_sample_tree(tmp_path_factory.mktemp("farm") / "input", MISSION, n_fail=2, n_pass=3, seed=2)


@pytest.fixture(scope="module")
def reference(tree: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """`stage-a run` on one machine (SQLite), greedy: the bytes the farm must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_")}
    env.update(STAGE_A_CACHE_DIR=str(tmp / "cache"), PYTHONIOENCODING="utf-8", COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "--mission", MISSION, "--input-dir", str(tree),
         "--output-dir", str(tmp / "out"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
         "--max-new-tokens", "12", "--batch-size", "4"],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = (tmp / "out" / JSONL).read_bytes()
    assert data.count(b"\n") == 5
    return data


@pytest.fixture(scope="module")
def farm_db() -> Iterator[str]:
    """One PostgreSQL database for the module's farm (a farm database holds many runs)."""
    with pg_database("stage_a_farm") as url:
        yield url


def stop_workers(workers: list[Worker]) -> None:
    """Warm shutdown (SIGTERM to the whole group, as systemd does), then SIGKILL what is left."""
    for w in workers:
        if w.alive():
            w.kill(signal.SIGTERM)
        w.stop()


def wait_ready(workers: list[Worker], broker: str) -> None:
    """Poll Celery's control ping until every worker answers (the operator's `celery inspect ping`)."""
    from celery import Celery

    app = Celery("stage_a_test_ping", broker=broker)
    app.conf.broker_connection_retry_on_startup = True
    try:
        deadline = time.monotonic() + WORKER_READY_DEADLINE_S
        names = {f"{w.name}@{socket.gethostname()}" for w in workers}
        while True:
            for w in workers:
                w.assert_alive()
            replies = app.control.ping(destination=sorted(names), timeout=1.0) or []
            if names <= {k for reply in replies for k in reply}:
                return
            assert time.monotonic() < deadline, "workers not ready\n" + "\n".join(w.log()[-3000:] for w in workers)
    finally:
        clean_redis(app.control.mailbox.oid)
        app.close()


@dataclass
class Farm:
    queue: str
    db_url: str
    env: dict[str, str]
    workers: list[Worker]
    tmp: Path

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in self.workers)


@pytest.fixture(scope="module")
def farm(farm_db: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    tmp = tmp_path_factory.mktemp("workers")
    token = uuid.uuid4().hex[:10]
    queue = f"stage_a_test_{token}"
    env = cli_env(tmp, queue, farm_db, STAGE_A_CHECKPOINT=str(tiny_checkpoint), STAGE_A_DEVICE="cpu",
                  STAGE_A_FLUSH_SIZE="3", STAGE_A_FLUSH_INTERVAL="0.5", CUDA_VISIBLE_DEVICES="")
    workers: list[Worker] = []
    try:
        for i in (1, 2):
            workers.append(Worker(f"w{i}-{token}", env, tmp).start())
        wait_ready(workers, env["STAGE_A_BROKER_URL"])
        yield Farm(queue, farm_db, env, workers, tmp)
    finally:
        stop_workers(workers)
        clean_redis(token)


def wait_finished(farm: Farm, run_id: int):  # type: ignore[no-untyped-def]
    from stage_a.store import ResultStore

    store = ResultStore(farm.db_url)
    try:
        deadline = time.monotonic() + FINISH_DEADLINE_S
        while True:
            for w in farm.workers:
                w.assert_alive()
            counts = store.queries.counts(run_id)
            if counts.finished:
                return counts, image_rows(store, run_id)
            assert time.monotonic() < deadline, f"run {run_id} not finished: {counts}\n{farm.logs()}"
            time.sleep(0.5)
    finally:
        store.close()


def wait_queue_drained(queue: str) -> None:
    """Every message acknowledged: nothing left on the queue, nothing unacked for it."""
    r = redis_client()
    deadline = time.monotonic() + 30
    while True:
        unacked = [v for v in r.hvals("unacked") if queue.encode() in v]
        if r.llen(queue) == 0 and not unacked:
            return
        assert time.monotonic() < deadline, f"queue {queue}: {r.llen(queue)} queued, {len(unacked)} unacked"
        time.sleep(0.2)


# ---- the farm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_group", "per_image"])
def test_farm_matches_stage_a_run(mode: str, farm: Farm, tree: Path, tiny_checkpoint: Path,
                                  reference: bytes, tmp_path: Path) -> None:
    enq = stage_a(enqueue_args(tree, tiny_checkpoint, mode), farm.env, tmp_path)
    run_id = run_id_of(enq)
    unit = "group" if mode == "per_group" else "image"
    assert f"{5 if mode == 'per_group' else 12} {unit} tasks queued" in enq.stdout, enq.stdout

    counts, rows = wait_finished(farm, run_id)
    assert (counts.done, counts.failed, counts.images_total) == (12, 0, 12), farm.logs()
    assert (counts.groups_done, counts.groups_total) == (5, 5)
    # Exactly once: one row per image, each leased (delivered) once and done by one worker process.
    keys = [(r["group_position"], r["image_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert all(r["status"] == "done" and r["summary"] and r["error"] is None for r in rows)
    assert all(r["attempts"] == 1 for r in rows), [(k, r["attempts"]) for k, r in zip(keys, rows, strict=True)]
    workers = {r["worker"] for r in rows}
    assert 1 <= len(workers) <= 2 and all(re.fullmatch(r"[^:]+:\d+", w) for w in workers), workers
    if mode == "per_image":  # 12 messages, 3 per flush: both workers took a share
        assert len(workers) == 2, workers
    wait_queue_drained(farm.queue)

    status = stage_a(["status", str(run_id)], farm.env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert "images 12/12 finished (done 12, failed 0, pending 0, in flight 0)" in status.stdout, status.stdout
    assert "groups: 5/5 complete" in status.stdout and "state: finished" in status.stdout
    assert all(w in status.stdout for w in workers), status.stdout

    # Everything is done: re-enqueueing the run queues nothing.
    again = stage_a(["enqueue", "--run", str(run_id)], farm.env, tmp_path)
    assert run_id_of(again) == run_id
    assert "re-enqueue 0 unfinished images" in again.stdout and f"0 {unit} tasks queued" in again.stdout

    out = tmp_path / "export"
    exp = stage_a(["export", str(run_id), "--output-dir", str(out), "--require-finished"], farm.env, tmp_path)
    assert exp.returncode == 0, exp.stderr
    assert (out / JSONL).read_bytes() == reference
    assert (out / FAILURES).read_bytes() == b""
    # The end-of-run report beside them, its figures checked against the store; workers by node:pid.
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    check_report(report, farm.db_url, run_id)
    assert {w["worker"] for w in report["workers"]} == workers
    assert all(re.fullmatch(r"w[12]-[^@]+@[^:]+:\d+", w) for w in workers), workers
    assert stage_a(["status", str(run_id), "--exit-code"], farm.env, tmp_path).returncode == 0


# ---- enqueue / status / export on an unfinished run (no workers on this queue) ----------------


def test_reenqueue_queues_only_unfinished_images(tree: Path, tiny_checkpoint: Path, pg_url: str, queue: str,
                                                 tmp_path: Path) -> None:
    from stage_a.store import ResultStore
    from stage_a.work import ImageKey, ImageResult

    env = cli_env(tmp_path, queue, pg_url)
    run_id = run_id_of(stage_a(enqueue_args(tree, tiny_checkpoint, "per_image"), env, tmp_path))
    first = queued_payloads(queue)
    keys = [k for p in first for k in payload_keys(p)]
    assert len(keys) == len(set(keys)) == 12
    assert all(set(p) == {"v", "store", "run_id", "keys"} and p["v"] == 2 for p in first)  # keys, never paths
    assert {p["store"] for p in first} == {store_id_of(pg_url)}
    assert {p["run_id"] for p in first} == {run_id}
    clear(redis_client(), queue)  # the farm consumed them...

    store = ResultStore(pg_url)
    try:
        # ...and finished group 0 and one image of group 1; group 2 image 1 failed (failed is final too).
        done = [ImageKey(run_id, 0, r["image_index"]) for r in image_rows(store, run_id) if r["group_position"] == 0]
        done.append(ImageKey(run_id, 1, 1))
        store.record_results([ImageResult(key=k, summary="无关图片") for k in done], "test-worker")
        store.record_results([ImageResult(key=ImageKey(run_id, 2, 1), error="unreadable")], "test-worker")
        unfinished = {(it.key.group_position, it.key.image_index) for it in store.unfinished_items(run_id)}
        assert len(unfinished) == 12 - len(done) - 1

        again = stage_a(["enqueue", "--run", str(run_id)], env, tmp_path)
        assert run_id_of(again) == run_id
        assert f"re-enqueue {len(unfinished)} unfinished images" in again.stdout, again.stdout
        requeued = queued_payloads(queue)
        assert sorted(k for p in requeued for k in payload_keys(p)) == sorted(unfinished)
        clear(redis_client(), queue)

        # Everything finished: nothing is queued.
        store.record_results([ImageResult(key=ImageKey(run_id, p, i), summary="无关图片") for p, i in unfinished],
                             "test-worker")
        last = stage_a(["enqueue", "--run", str(run_id)], env, tmp_path)
        assert "re-enqueue 0 unfinished images" in last.stdout and "0 image tasks queued" in last.stdout
        assert redis_client().llen(queue) == 0
    finally:
        store.close()


def test_per_group_enqueue_sends_whole_groups(tree: Path, tiny_checkpoint: Path, pg_url: str,
                                              queue: str, tmp_path: Path) -> None:
    env = cli_env(tmp_path, queue, pg_url)
    proc = stage_a(enqueue_args(tree, tiny_checkpoint, "per_group"), env, tmp_path)
    run_id = run_id_of(proc)
    assert "5 groups" in proc.stdout and "12 images" in proc.stdout and "5 group tasks queued" in proc.stdout
    payloads = queued_payloads(queue)
    keys = [payload_keys(p) for p in payloads]
    assert sum(len(k) for k in keys) == 12 and {p["run_id"] for p in payloads} == {run_id}
    # Whole groups in key order: each group's images in one chunk, all of them, in order.
    flat = [key for k in keys for key in k]
    assert flat == sorted(flat)
    for k in keys:
        for pos in {p for p, _ in k}:
            assert [i for p, i in k if p == pos] == list(range(1, 1 + sum(1 for p, _ in flat if p == pos)))


def test_status_and_export_of_an_unfinished_run(tree: Path, tiny_checkpoint: Path, pg_url: str, queue: str,
                                                tmp_path: Path) -> None:
    from stage_a.store import ResultStore
    from stage_a.work import ImageKey, ImageResult

    env = cli_env(tmp_path, queue, pg_url)
    run_id = run_id_of(stage_a(enqueue_args(tree, tiny_checkpoint, "per_image"), env, tmp_path))
    store = ResultStore(pg_url)
    try:
        rows = image_rows(store, run_id)
        group_sizes = [sum(1 for r in rows if r["group_position"] == g) for g in range(5)]
        # Groups 0 and 3 complete; group 1 half done; group 4 has one image in flight.
        done = [ImageKey(run_id, g, i) for g in (0, 3) for i in range(1, group_sizes[g] + 1)]
        done.append(ImageKey(run_id, 1, 1))
        store.record_results([ImageResult(key=k, summary=f"s{k.group_position}.{k.image_index}") for k in done],
                             "host-a:123")
        store.lease([ImageKey(run_id, 4, 1)], "host-b:456", 600)
        groups = list(store.queries.iter_export_groups(run_id))
    finally:
        store.close()
    pending = 12 - len(done) - 1

    status = stage_a(["status", str(run_id)], env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert (f"images {len(done)}/12 finished (done {len(done)}, failed 0, pending {pending}, in flight 1)"
            in status.stdout), status.stdout
    assert "groups: 2/5 complete" in status.stdout
    assert "workers: host-a:123, host-b:456" in status.stdout and "state: running" in status.stdout
    assert "throughput:" in status.stdout and "ETA" in status.stdout

    # --require-finished: exit 4, one line, no files at all.
    strict_out = tmp_path / "strict"
    strict = stage_a(["export", str(run_id), "--output-dir", str(strict_out), "--require-finished"], env, tmp_path)
    assert strict.returncode == 4, strict.stderr
    assert "not finished" in strict.stderr and "nothing written" in strict.stderr
    assert not strict_out.exists() or not any(strict_out.iterdir())

    # Default: says so, writes the complete groups (in order), reports the others as incomplete.
    out = tmp_path / "partial"
    exp = stage_a(["export", str(run_id), "--output-dir", str(out)], env, tmp_path)
    assert exp.returncode == 3, exp.stderr
    assert f"run {run_id} is not finished: {pending + 1} of 12 images pending" in exp.stderr
    assert "exporting complete groups only" in exp.stderr
    assert "2 groups written" in exp.stdout and "3 incomplete" in exp.stdout
    records = [json.loads(line) for line in (out / JSONL).read_text(encoding="utf-8").splitlines()]
    assert [(r["group_id"], r["label"]) for r in records] == [(groups[g].group_id, groups[g].label) for g in (0, 3)]
    assert records[0]["per_image"] == {f"image_{i}": f"s0.{i}" for i in range(1, group_sizes[0] + 1)}
    failures = [json.loads(line) for line in (out / FAILURES).read_text(encoding="utf-8").splitlines()]
    assert [(f["position"], f["status"]) for f in failures] == [(1, "incomplete"), (2, "incomplete"),
                                                               (4, "incomplete")]
