"""Poison messages: rejected with a logged reason and a dead-letter row, never retried, never a crash.

A real worker on its own Redis receives every kind of bad message mixed with a real run's good
ones; the good run still completes, on the same pool process, and nothing is left on the broker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.farm import MISSION, Farm, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import dead_letters, image_rows, store_id_of

from stage_a.config import GenerationParams, RunSpec

pytestmark = pytest.mark.slow


class _OpensAFileWhenUnpickled:
    """A pickle payload with a side effect: if the worker ever unpickled it, ``marker`` would appear."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _register(db_url: str, input_dir: Path, checkpoint: Path) -> tuple[int, list[Any]]:
    from producer.register import register_run
    from stage_a.store import ResultStore

    store = ResultStore(db_url)
    # The run names the farm's model: a pinned worker serves no other (and never a demo run).
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", batch_size=4, sharding_mode="per_image",
                   generation=GenerationParams(max_new_tokens=4), checkpoint=str(checkpoint))
    reg = register_run(store, spec, input_dir, farm=True)
    items = store.unfinished_items(reg.run_id)
    store.close()
    return reg.run_id, items


def _publish_raw(broker_url: str, queue: str, payloads: list[Any], serializer: str = "json") -> None:
    """Send task messages as a foreign producer would (plain Celery, any payload, any serializer)."""
    from celery import Celery

    rogue = Celery("rogue", broker=broker_url, set_as_current=False)
    rogue.conf.update(task_serializer=serializer, accept_content=["pickle", "json"])
    for payload in payloads:
        rogue.send_task("stage_a.summarize", args=[payload], queue=queue, serializer=serializer)
    rogue.close()


def test_poison_messages_are_dead_lettered_and_the_worker_goes_on(pg_url: str, farm_factory, tmp_path: Path,  # noqa: F811
                                                                  tiny_checkpoint: Path) -> None:
    from producer.publish import Publisher
    from stage_a.settings import Settings
    from stage_a.store import ResultStore

    make_tree(tmp_path / "in", groups=2, per_group=2)
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    (tmp_path / "in" / "links").mkdir()
    os.symlink(secret, tmp_path / "in" / "links" / "evil.jpg")
    run_id, items = _register(pg_url, tmp_path / "in", tiny_checkpoint)
    good = items[0].to_message()

    farm: Farm = farm_factory(pg_url)
    worker = farm.worker("p")
    wait_for(worker.ready, 90, "worker ready", on_timeout=farm.logs)
    pool_before = worker.pids()

    # (payload, expected fragment of the logged / dead-lettered reason)
    poison: list[tuple[Any, str]] = [
        ({"v": 1, "group_position": 0, "image_index": 1, "path": good["path"]}, "'run_id' must be a non-negative integer, got None"),
        ({**good, "run_id": str(run_id)}, f"'run_id' must be a non-negative integer, got '{run_id}'"),
        ({**good, "image_index": [1]}, "'image_index' must be"),
        ("just a string", "payload must be a JSON object"),
        ({**good, "run_id": 999_999}, "unknown run 999999"),
        ({**good, "path": "../../etc/passwd"}, "path leaves the input root: ../../etc/passwd"),
        ({**good, "path": "/etc/passwd"}, "absolute path not allowed: /etc/passwd"),
        ({**good, "path": "links/evil.jpg"}, "path leaves the input root: links/evil.jpg"),
        ({**good, "group_position": 0, "image_index": 99}, "is not in run"),
    ]
    settings = Settings(broker_url=farm.redis.url, database_url=pg_url, queue=farm.queue)
    publisher = Publisher(settings)
    marker = tmp_path / "UNPICKLED"
    _publish_raw(farm.redis.url, farm.queue, [_OpensAFileWhenUnpickled(str(marker))], serializer="pickle")
    _publish_raw(farm.redis.url, farm.queue, [p for p, _ in poison])
    publisher.publish_items(items, "per_image", store_id_of(pg_url))  # the good run, after the poison

    counts = farm.wait_finished(run_id, 150)
    assert counts.done == 4 and counts.failed == 0

    # Nothing is retried forever: after a few flush intervals the broker holds nothing, and each
    # poison message was dead-lettered exactly once.
    store = ResultStore(pg_url)
    wait_for(lambda: farm.redis.queued(farm.queue) == 0 and farm.redis.unacked() == 0
             and len(dead_letters(store)) >= len(poison) + 1, 30, "the broker drained and every poison dead-lettered",
             on_timeout=farm.logs)
    letters = dead_letters(store)
    store.close()
    # ... the pickle message too, refused by Celery's consumer (workers/poison.py records it).
    assert len(letters) == len(poison) + 1, letters
    assert sum("Refusing to deserialize untrusted content of type pickle" in r for r, _ in letters) == 1, letters
    log = worker.log()
    for _payload, fragment in poison:
        assert sum(fragment in reason for reason, _ in letters) == 1, (fragment, letters)
        assert f"rejected message: {fragment}" in log or fragment in log.split("rejected message: ", 1)[-1]
    assert all(payload for _, payload in letters)  # the payload is kept for the operator
    # The pickle was refused before any of its bytes were unpickled, and said so in the log.
    assert not marker.exists()
    # (Celery logs it with the stack of the refusal, then discards the message.)
    assert "Received invalid task message: Refusing to deserialize untrusted content of type pickle" in log, log[-3000:]
    # Same pool process all along: no poison crashed it, and the task code logged nothing but
    # the one-line rejections.
    worker.assert_alive()
    assert worker.pids() == pool_before
    task_errors = [ln for ln in log.splitlines() if "/ForkPoolWorker" in ln and ("ERROR" in ln or "CRITICAL" in ln)]
    assert task_errors and all("rejected message: " in ln for ln in task_errors), task_errors
    assert "Unrecoverable" not in log and "WorkerLostError" not in log


def test_redelivery_is_bounded_then_failed_and_dead_lettered(pg_url: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    """An image whose deliveries keep dying (it kills the worker) is failed after N attempts."""
    from stage_a.messages import image_payload
    from stage_a.settings import Settings
    from workers.runtime import WorkerRuntime

    make_tree(tmp_path / "in", groups=1, per_group=2)
    run_id, items = _register(pg_url, tmp_path / "in", tiny_checkpoint)
    rt = WorkerRuntime(Settings(database_url=pg_url, max_delivery_attempts=3))
    for _ in range(3):  # three deliveries whose worker died before writing a result
        rt.store.lease([items[0].key], "dead-worker", 0.01)
    rt.process([image_payload(items[0], rt.store.store_id)])  # the fourth delivery: no model is even loaded
    rows = image_rows(rt.store, run_id)
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "gave up after 3 deliveries without a result"
    assert rows[1]["status"] == "pending"
    assert [r for r, _ in dead_letters(rt.store)] == [f"image {items[0].key}: gave up after 3 deliveries without a result"]
    assert rt.host.engine is None  # no model was loaded for it
    rt.store.close()
