"""The fast publisher writes exactly the messages Celery itself would, and a real worker runs them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

PAYLOADS = [
    {"v": 1, "run_id": 3, "group_position": 0, "image_index": 1, "path": "挡风板安装检查/审核通过/QC-1/a.jpg"},
    {"v": 1, "run_id": 3, "group_position": 7, "image_index": 12, "path": "m/审核不通过/g 2/IMG_0001.JPG"},
    # characters where Celery's saferepr and repr differ, and a path past saferepr's size limit
    {"v": 1, "run_id": 3, "group_position": 1, "image_index": 2, "path": "m/a'b\"c\\d/x\ty.jpg"},
    {"v": 1, "run_id": 3, "group_position": 1, "image_index": 3, "path": "m/" + "长" * 600 + ".jpg"},
    # a per_group payload (nested)
    {"v": 1, "run_id": 3, "group_position": 4,
     "images": [{"image_index": 1, "path": "m/审核通过/g/1.jpg"}, {"image_index": 2, "path": "m/审核通过/g/2.jpg"}]},
    # chunks (version 2): keys only; one past saferepr's size limit
    {"v": 2, "store": "0123456789abcdef", "run_id": 3, "keys": [[0, 1], [0, 2], [1, 1]]},
    {"v": 2, "store": "0123456789abcdef", "run_id": 3, "keys": [[p, i] for p in range(100) for i in (1, 2)]},
    # the shape of an earlier chunk (its rendered argsrepr is reused), then other runs, stores and sizes
    {"v": 2, "store": "0123456789abcdef", "run_id": 3, "keys": [[9, 4], [12, 1], [4000, 77]]},
    {"v": 2, "store": "0123456789abcdef", "run_id": 31, "keys": [[9, 4], [12, 1], [4000, 77]]},
    {"v": 2, "store": "fedcba9876543210", "run_id": 3, "keys": [[0, 1], [0, 2], [1, 1]]},
    {"v": 2, "store": "0123456789abcdef", "run_id": 3, "keys": [[p, 1] for p in range(32)]},
]


@pytest.fixture()
def queue() -> Iterator[str]:
    import redis

    name = f"stage_a_test_publish_{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - CI starts Redis; say why if it is not there
        pytest.fail(f"Redis not reachable at {REDIS_URL}: {exc}")
    yield name
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")


def _publisher(queue: str):  # type: ignore[no-untyped-def]
    from producer.publish import Publisher
    from stage_a.settings import Settings

    return Publisher(replace(Settings(), broker_url=REDIS_URL, queue=queue))


def test_fast_message_is_byte_identical_to_celerys_own(queue: str) -> None:
    """Same task id and delivery tag in, the very same Redis value out, for every kind of payload."""
    import redis

    from producer.publish import _FastRedisPublish

    pub = _publisher(queue)
    client = redis.Redis.from_url(REDIS_URL)
    with pub.app.connection_for_write() as conn:
        fast = _FastRedisPublish(pub.app, conn, queue)
        for payload in PAYLOADS:
            assert pub.send([payload]) == 1  # Celery's create_task_message + send_task_message
            celery_raw = client.rpop(queue).decode("utf-8")
            env = json.loads(celery_raw)
            ours = fast.encode(payload, env["headers"]["id"], env["properties"]["delivery_tag"])
            assert ours == celery_raw
    assert client.llen(queue) == 0


def test_fast_publish_decodes_like_send_task(queue: str) -> None:
    """Through kombu's own consumer side: task header, ids, argsrepr shape, body, FIFO order."""
    pub = _publisher(queue)
    assert pub.publish(PAYLOADS) == len(PAYLOADS)
    pub.app.send_task("stage_a.summarize", args=(PAYLOADS[0],), queue=queue)  # Celery's apply_async path
    assert pub.length() == len(PAYLOADS) + 1
    got = []
    with pub.app.connection_for_read() as conn:
        channel = conn.default_channel
        for _ in range(len(PAYLOADS) + 1):
            message = channel.basic_get(queue, no_ack=True)
            assert message is not None
            got.append(message)
    reference = got[-1]
    ids = set()
    for payload, message in zip(PAYLOADS, got, strict=False):
        args, kwargs, embed = message.decode()
        assert args == [payload] and kwargs == {}
        assert embed == reference.decode()[2]
        h = message.headers
        assert h["task"] == "stage_a.summarize" and h["lang"] == "py"
        assert str(uuid.UUID(h["id"])) == h["id"] and h["root_id"] == h["id"] and h["parent_id"] is None
        assert message.properties["correlation_id"] == h["id"]
        assert h["argsrepr"].startswith("({") and h["kwargsrepr"] == "{}"
        assert set(h) == set(reference.headers)
        assert set(message.properties) == set(reference.properties)
        assert message.content_type == "application/json" and message.content_encoding == "utf-8"
        ids.add(h["id"])
    assert len(ids) == len(PAYLOADS)


def test_many_messages_and_ids_are_unique(queue: str) -> None:
    payloads = [{"v": 1, "run_id": 1, "group_position": i // 5, "image_index": i % 5 + 1, "path": f"m/{i}.jpg"}
                for i in range(5000)]
    pub = _publisher(queue)
    assert pub.publish(iter(payloads)) == 5000
    import redis

    raw = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
    assert len(raw) == 5000
    envs = [json.loads(r) for r in reversed(raw)]  # LPUSH: the list head is the newest
    assert [json.loads(base64.b64decode(e["body"]))[0][0] for e in envs] == payloads
    assert len({e["headers"]["id"] for e in envs}) == 5000
    assert len({e["properties"]["delivery_tag"] for e in envs}) == 5000


@pytest.mark.slow
def test_a_real_celery_worker_runs_fast_published_messages(queue: str, tmp_path: Path) -> None:
    """`celery worker` (a probe app with a stage_a.summarize task) consumes and runs them, in order."""
    import redis

    results = f"{queue}_results"
    env = dict(os.environ, PROBE_BROKER_URL=REDIS_URL, PROBE_QUEUE=queue, PROBE_RESULTS=results)
    log = tmp_path / "worker.log"
    tests_dir = Path(__file__).resolve().parent
    pub = _publisher(queue)
    assert pub.publish(PAYLOADS) == len(PAYLOADS)
    client = redis.Redis.from_url(REDIS_URL)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "_publish_probe_app", "worker", "--pool", "solo",
             "--concurrency", "1", "-n", f"probe-{queue}@%h", "--loglevel", "INFO"],
            cwd=tests_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while client.llen(results) < len(PAYLOADS):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        done = [json.loads(r) for r in client.lrange(results, 0, -1)]
        assert [d["payload"] for d in done] == PAYLOADS
        assert all(str(uuid.UUID(d["id"])) == d["id"] for d in done)
        assert client.llen(queue) == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.delete(results)


@pytest.mark.parametrize("mode", ["per_image", "per_group"])
def test_the_broker_holds_under_200_bytes_per_queued_image(queue: str, mode: str) -> None:
    """Chunks of keys, not a message per image (~1,400 bytes each): measured by Redis itself."""
    import redis

    from stage_a.work import ImageKey, WorkItem

    n = 20_000
    items = (WorkItem(ImageKey(12345, i // 3, i % 3 + 1), f"挡风板安装检查/审核通过/QC-{i // 3:06d}/{i}.jpg")
             for i in range(n))
    queued = _publisher(queue).publish_items(items, mode, "0123456789abcdef")
    assert queued == (n if mode == "per_image" else -(-n // 3))  # images, or groups
    client = redis.Redis.from_url(REDIS_URL)
    messages = client.llen(queue)
    assert messages < n / 16
    per_image = client.memory_usage(queue, samples=0) / n
    assert per_image < 200, f"{per_image:.0f} bytes per queued image ({messages} messages)"
