"""`celery -A workers flower` sees the farm: the worker by its -n name, the `stage_a.summarize` task, its queue.

Flower and one worker run as real processes against the real Redis; the test reads Flower's HTTP API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from support.store import image_rows

pytestmark = pytest.mark.slow

# A Redis DB for this module only; names carry a per-test token, cleanup is key by key (never FLUSHDB).
REDIS_DB = int(os.environ.get("STAGE_A_TEST_FLOWER_REDIS_DB", "14"))
DEADLINE_S = 120.0


def redis_url() -> str:
    base = urlsplit(os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit(base._replace(path=f"/{REDIS_DB}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=15) as resp:
        return json.loads(resp.read().decode())


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # prefork children too
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


def tail(log: Path, n: int = 40) -> str:
    return f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def redis_snapshot() -> dict[bytes, set[bytes]]:
    """Keys of the test DB, with the members of kombu's binding sets."""
    import redis

    r = redis.Redis.from_url(redis_url())
    return {k: (r.smembers(k) if k.startswith(b"_kombu.binding.") else set()) for k in r.scan_iter(count=1000)}


def clean_redis(before: dict[bytes, set[bytes]], token: str) -> None:
    """Drop what this test created: keys and bindings naming the token, Flower's event and reply queues."""
    import redis

    def ours(name: bytes) -> bool:
        text = name.decode(errors="replace")
        return token in text or "celeryev." in text or text.endswith(".reply.celery.pidbox")

    r = redis.Redis.from_url(redis_url())
    for key in r.scan_iter(count=1000):
        if key.startswith(b"_kombu.binding."):
            stale = [m for m in r.smembers(key) - before.get(key, set()) if ours(m)]
            if stale:
                r.srem(key, *stale)
        elif key not in before and ours(key):
            r.delete(key)


def test_flower_api_lists_the_worker_and_its_task(pg_url: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    token = uuid.uuid4().hex[:10]
    queue = f"stage_a_test_{token}"
    worker_name = f"gpu0-{token}@{socket.gethostname()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_")}
    env.update(STAGE_A_BROKER_URL=redis_url(), STAGE_A_QUEUE=queue, STAGE_A_DATABASE_URL=pg_url,
               STAGE_A_DEVICE="cpu", STAGE_A_CACHE_DIR=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="",
               STAGE_A_CHECKPOINT=str(tiny_checkpoint), STAGE_A_FLUSH_SIZE="4",
               FLOWER_UNAUTHENTICATED_API="true")
    before = redis_snapshot()
    celery = [sys.executable, "-m", "celery", "-A", "workers"]
    procs: list[subprocess.Popen[bytes]] = []
    logs = {"worker": tmp_path / "worker.log", "flower": tmp_path / "flower.log"}
    try:
        with logs["worker"].open("wb") as out:
            procs.append(subprocess.Popen(
                [*celery, "worker", "-n", worker_name, "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO"],
                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with logs["flower"].open("wb") as out:
            procs.append(subprocess.Popen(
                [*celery, "flower", f"--port={port}", "--address=127.0.0.1", "--inspect_timeout=5000"],
                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + DEADLINE_S
        info: dict[str, Any] = {}
        while True:
            dead = [name for name, p in zip(logs, procs, strict=True) if p.poll() is not None]
            assert not dead, f"{dead} exited\n" + "\n".join(tail(logs[n]) for n in dead)
            try:
                workers = get_json(f"{base}/api/workers?refresh=1")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                workers = {}  # Flower still starting (or a slow inspect round)
            info = workers.get(worker_name) or {}
            if info.get("registered") and info.get("active_queues"):
                break
            assert time.monotonic() < deadline, (f"Flower never listed {worker_name}: {sorted(workers)}\n"
                                                 + "\n".join(tail(log) for log in logs.values()))
            time.sleep(1.0)

        assert "stage_a.summarize" in info["registered"]
        assert queue in [q["name"] for q in info["active_queues"]]
        assert info["stats"]["pool"]["max-concurrency"] == 1
        # The online list (from worker events) names the worker too.
        deadline = time.monotonic() + DEADLINE_S
        while not get_json(f"{base}/api/workers?status=true").get(worker_name):
            assert time.monotonic() < deadline, "worker never reported online through events"
            time.sleep(1.0)

        # Tasks show up too (celery-batches sends no events, the batch task sends them itself), each
        # as it went: a message for an unknown run is FAILURE with the reason, so is the task of an
        # image that failed; a good image is SUCCESS with its own share of the batch as runtime.
        from dataclasses import replace

        from producer.publish import Publisher
        from producer.register import register_run
        from producer.sample_data import make_sample_tree
        from stage_a.config import GenerationParams, RunSpec
        from stage_a.settings import Settings
        from stage_a.store import ResultStore

        mission = "挡风板安装检查"
        root = make_sample_tree(tmp_path / "in", mission, n_fail=1, n_pass=0, seed=3)
        bad = root / mission / "审核不通过" / "QC-DEMO-20241206-0000001" / "zz_broken.jpg"
        bad.write_bytes(b"\xff\xd8 not a jpeg")
        store = ResultStore(pg_url)
        try:
            spec = RunSpec(mission=mission, dataset="bbu", input_root="", checkpoint=str(tiny_checkpoint),
                           batch_size=4, sharding_mode="per_image", generation=GenerationParams(max_new_tokens=4))
            run_id = register_run(store, spec, root, farm=True).run_id
            items = store.unfinished_items(run_id)
            store_id = store.store_id
        finally:
            store.close()
        publisher = Publisher(replace(Settings(), broker_url=redis_url(), queue=queue))
        publisher.publish([{"v": 1, "run_id": 987654, "group_position": 0, "image_index": 1, "path": "a/b.jpg"}])
        publisher.publish_items(items, "per_image", store_id)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            tasks = get_json(f"{base}/api/tasks")
            ours = [t for t in tasks.values() if t.get("name") == "stage_a.summarize"]
            if len([t for t in ours if t.get("state") in ("SUCCESS", "FAILURE")]) == len(items) + 1:
                break
            assert time.monotonic() < deadline, f"Flower never listed every stage_a.summarize task: {tasks}"
            time.sleep(1.0)
        failed = [t for t in ours if t["state"] == "FAILURE"]
        succeeded = [t for t in ours if t["state"] == "SUCCESS"]
        assert len(failed) == 2 and len(succeeded) == len(items) - 1, ours
        reasons = sorted(str(t.get("exception")) for t in failed)
        assert any("unknown run 987654" in r for r in reasons), reasons
        assert any(r.startswith(f"run {run_id}: failed: ") and "zz_broken.jpg" in r for r in reasons), reasons
        # The run id is visible per task, and a task's runtime is its own share of its batch.
        assert all(f"run {run_id}" in str(t.get("args")) for t in succeeded), succeeded
        assert all(f"run {run_id}: done, 1 image(s)" == t.get("result") for t in succeeded), succeeded
        store = ResultStore(pg_url)
        try:
            rows = image_rows(store, run_id)
        finally:
            store.close()
        batch_seconds = sum((r["generate_ms"] or 0) + (r["preprocess_ms"] or 0) for r in rows) / 1000
        assert all(0 < t["runtime"] for t in succeeded), succeeded
        assert sum(t["runtime"] for t in succeeded) <= batch_seconds + 5.0, (succeeded, batch_seconds)
    finally:
        stop(procs)
        clean_redis(before, token)
