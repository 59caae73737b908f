"""Any entry on the queue, whatever its bytes, is one dead letter and the worker goes on (issue 11, 5-6).

Raw entries are LPUSHed straight into the Redis list a real `celery -A workers worker` consumes:
not JSON, not an envelope, a body that is not base64, a body that is not [args, kwargs, embed],
refused content types (pickle among them), an unknown task, a task message without an id, a
huge entry. Bad payloads (NUL in a path, a run id beyond the database's integers, a per_group
message listing thousands of images) share a buffer with good messages. Every one is one dead
letter naming why, the good run finishes on the same worker processes, and the broker ends empty.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.farm import MISSION, Farm, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import dead_letters, store_id_of

from stage_a.config import GenerationParams, RunSpec

pytestmark = pytest.mark.slow


def _register(db_url: str, input_dir: Path, checkpoint: Path) -> tuple[int, list[Any]]:
    from producer.register import register_run
    from stage_a.store import ResultStore

    store = ResultStore(db_url)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", batch_size=4, sharding_mode="per_image",
                   generation=GenerationParams(max_new_tokens=4), checkpoint=str(checkpoint))
    run_id = register_run(store, spec, input_dir, farm=True).run_id
    items = store.unfinished_items(run_id)
    store.close()
    return run_id, items


def envelope(queue: str, body: bytes, content_type: str = "application/json", task: str = "stage_a.summarize",
             with_id: bool = True, body_encoding: str = "base64") -> bytes:
    """A kombu Redis envelope as Celery writes it, with the given body and headers."""
    tid = str(uuid.uuid4())
    headers: dict[str, Any] = {"lang": "py", "task": task, "root_id": tid, "parent_id": None, "argsrepr": "",
                               "kwargsrepr": "{}", "origin": "test", "retries": 0, "eta": None}
    if with_id:
        headers["id"] = tid
    return json.dumps({
        "body": base64.b64encode(body).decode() if body_encoding == "base64" else body.decode(),
        "content-encoding": "utf-8" if "json" in content_type else "binary",
        "content-type": content_type, "headers": headers,
        "properties": {"correlation_id": tid, "reply_to": "", "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "body_encoding": body_encoding,
                       "delivery_tag": str(uuid.uuid4())},
    }).encode()


class _OpensAFileWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_every_queue_entry_is_dead_lettered_and_the_worker_goes_on(pg_url: str, farm_factory,  # noqa: F811
                                                                   tiny_checkpoint: Path, tmp_path: Path) -> None:
    from producer.publish import Publisher
    from stage_a.messages import image_payload
    from stage_a.settings import Settings
    from stage_a.store import ResultStore

    make_tree(tmp_path / "in", groups=3, per_group=2)
    run_id, items = _register(pg_url, tmp_path / "in", tiny_checkpoint)
    farm: Farm = farm_factory(pg_url)
    worker = farm.worker("poison")
    wait_for(worker.ready, 90, "worker ready", on_timeout=farm.logs)
    pool_before = worker.pids()
    q = farm.queue
    store_id = store_id_of(pg_url)
    good = image_payload(items[0], store_id)
    marker = tmp_path / "UNPICKLED"

    def body(args: Any) -> bytes:
        return json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()

    # (raw entry, fragment of its dead letter's reason)
    raw: list[tuple[bytes, str]] = [
        (b"not json at all \xff\xfe\x00", "queue entry is not JSON"),
        (b"[1, 2, 3]", "queue entry is not a kombu envelope (a JSON list)"),
        (b"{}", "queue entry has no 'properties' object"),
        (json.dumps({"body": "", "properties": {"delivery_info": {"exchange": "", "routing_key": q}}}).encode(),
         "queue entry has no delivery tag"),
        (envelope(q, b"x").replace(base64.b64encode(b"x"), b"!!!abc"), "does not decode as 'base64'"),
        (envelope(q, b'{"hello": 1}'), "task body is not [args, kwargs, embed]"),
        (envelope(q, b"[1, 2]"), "task body is not [args, kwargs, embed]"),
        (envelope(q, b"[5, {}, {}]"), "task body is not [args, kwargs, embed]"),
        (envelope(q, b"definitely not json"), "message body does not decode"),
        (envelope(q, b"a: b", content_type="application/x-yaml"), "invalid task message (ContentDisallowed"),
        (envelope(q, pickle.dumps(_OpensAFileWhenUnpickled(str(marker))), content_type="application/x-python-serialize"),
         "invalid task message (ContentDisallowed"),
        (envelope(q, body([good]), task="someone.elses_task"), "unknown task 'someone.elses_task'"),
        (envelope(q, body([good]), with_id=False), "message could not be received (KeyError"),
        (b"x" * 5_000_000, "queue entry is not JSON"),
    ]
    # Bad payloads, each in a buffer with good messages (flush size 4).
    too_many = {"v": 1, "run_id": run_id, "group_position": 1,
                "images": [{"image_index": i, "path": f"QC-x-{i}.jpg"} for i in range(1, 5001)]}
    bad_payloads: list[tuple[Any, str]] = [
        ({**good, "path": "a\x00b.jpg"}, "field 'path' contains control characters"),
        ({**good, "run_id": 2**40}, "field 'run_id' is out of range"),
        (too_many, f"is not in run {run_id} (nor 4997 more of its 5000)"),
    ]
    r = farm.redis.client()
    for entry, _ in raw:
        r.lpush(q, entry)
    publisher = Publisher(Settings(broker_url=farm.redis.url, database_url=pg_url, queue=q))
    stream: list[Any] = []
    for i, it in enumerate(items):
        stream.append(image_payload(it, store_id))
        if i < len(bad_payloads):
            stream.append(bad_payloads[i][0])
    publisher.publish(stream)

    counts = farm.wait_finished(run_id, 180)
    assert counts.done == len(items) and counts.failed == 0
    store = ResultStore(pg_url)
    expected = len(raw) + len(bad_payloads)
    wait_for(lambda: farm.redis.queued(q) == 0 and farm.redis.unacked() == 0 and len(dead_letters(store)) >= expected,
             60, "every entry dead-lettered and the broker empty", on_timeout=farm.logs)
    letters = dead_letters(store)
    store.close()
    assert len(letters) == expected, [r for r, _ in letters]
    unmatched = list(letters)
    for _entry, fragment in raw + bad_payloads:
        hit = next((x for x in unmatched if fragment in x[0]), None)
        assert hit is not None, (fragment, [r for r, _ in unmatched])
        unmatched.remove(hit)
        assert hit[1] and len(hit[1]) <= 10_000  # the raw entry is kept, truncated
    # The same worker and pool process all along; the pickle was never unpickled.
    worker.assert_alive()
    assert worker.pids() == pool_before
    assert not marker.exists()
    log = worker.log()
    assert "Unrecoverable" not in log and "WorkerLostError" not in log
