"""Edges of routing by model (issue 18, found by review): nothing loops, nothing waits on a queue nobody reads.

- a LoRA run whose adapter at its path on the worker's host is not the run's adapter is refused there (not
  handed back to the queue it came from, which is the worker's own), the worker's problem says why, and
  status shows it;
- a run recorded before identities were by content has no route: its messages use the plain queue every
  worker consumes, and a worker pinned to the run's folder serves it;
- one model's queue that nobody drains does not stop orphan recovery of another model's run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.farm import make_tree
from support.lora import make_adapter
from support.queues import clear, queued_images, queued_raw
from support.store import image_rows

from stage_a.config import GenerationParams, RunSpec
from stage_a.messages import image_payload
from stage_a.queue import TaskQueue
from stage_a.settings import Settings
from stage_a.store import GroupInput, ResultStore, utcnow

REDIS_URL = "redis://127.0.0.1:6379/0"
MISSION = "挡风板安装检查"


@pytest.fixture()
def queue() -> Iterator[str]:
    import redis

    name = f"stage_a_edge_{uuid.uuid4().hex[:8]}"
    yield name
    clear(redis.Redis.from_url(REDIS_URL), name)


def _spec(checkpoint: Path | str) -> RunSpec:
    return RunSpec(mission=MISSION, dataset="bbu", input_root="", batch_size=4, checkpoint=str(checkpoint),
                   generation=GenerationParams(max_new_tokens=4))


def _register(store: ResultStore, input_dir: Path, checkpoint: Path) -> Any:
    from producer.register import register_run

    return register_run(store, _spec(checkpoint), input_dir, farm=True)


def test_a_rewritten_adapter_is_refused_without_a_hand_back_loop(pg_url: str, queue: str, tiny_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    from monitor.report import build_report
    from workers.runtime import WorkerRuntime

    make_tree(tmp_path / "in", groups=1, per_group=2)
    adapter = make_adapter(tiny_checkpoint, tmp_path / "lora")
    store = ResultStore(pg_url)
    reg = _register(store, tmp_path / "in", adapter)
    payloads = [image_payload(it, store.store_id) for it in store.unfinished_items(reg.run_id)]
    make_adapter(tiny_checkpoint, tmp_path / "lora", seed=7)  # another adapter copied over it after enqueue

    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, device="cpu",
                        checkpoint=str(tiny_checkpoint), cache_dir=str(tmp_path / "cache"))
    rt = WorkerRuntime(settings, name="w1@host:1")
    slept: list[float] = []
    rt.sleep = slept.append
    rt.heartbeats.beat("ready")
    for _ in range(3):
        outcomes = rt.process(payloads).outcomes
        assert [o.kind for o in outcomes] == ["refused", "refused"], outcomes
        assert f"run {reg.run_id} needs model" in (outcomes[0].reason or "")
    import redis

    assert queued_raw(redis.Redis.from_url(REDIS_URL), queue) == []  # nothing re-published: no loop
    assert {(r["status"], r["attempts"], r["model"]) for r in image_rows(store, reg.run_id)} == {("pending", 0, None)}
    report = build_report(store, reg.run_id, settings, now=utcnow())
    assert f"worker w1@host:1: run {reg.run_id} needs model" in (report.reason or ""), report.reason
    assert report.throughput.eta_s is None
    rt.store.close()
    store.close()


def test_a_run_recorded_before_content_identities_uses_the_plain_queue(pg_url: str, queue: str,
                                                                       tiny_checkpoint: Path, tmp_path: Path) -> None:
    from engine.hosting import ModelHost

    store = ResultStore(pg_url)
    old = store.create_run(_spec(tiny_checkpoint), [GroupInput("G1", "pass", ("a.jpg",))], farm=True,
                           model="tiny-qwen3-vl-v3:0123456789abcdef")  # the old '<folder>:<16 hex>' identity
    run = store.get_run(old)
    assert run.route is None
    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, checkpoint=str(tiny_checkpoint),
                        cache_dir=str(tmp_path / "cache"))
    assert TaskQueue(settings).queue_for(run.route) == queue  # the plain queue: every worker consumes it
    host = ModelHost(settings, "cpu")
    assert host.serves(run)  # the model at its path
    assert host._checkpoint_for(run).path == tiny_checkpoint.resolve()
    assert old not in {w.run_id for w in store.queries.routes_with_work()}
    store.close()


def test_a_queue_nobody_drains_does_not_stop_recovery_of_another_models_run(
        pg_url: str, queue: str, tiny_checkpoint: Path, other_checkpoint: Path, tmp_path: Path) -> None:
    from workers.reclaimer import Reclaimer

    make_tree(tmp_path / "in", groups=1, per_group=2)
    store = ResultStore(pg_url)
    stuck, lost = _register(store, tmp_path / "in", other_checkpoint), _register(store, tmp_path / "in", tiny_checkpoint)
    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, cache_dir=str(tmp_path / "cache"))
    q = TaskQueue(settings)
    q.send([image_payload(it, store.store_id) for it in store.unfinished_items(stuck.run_id)], q.queue_for(stuck.route))
    # `lost`'s messages are gone (a Redis restart); `stuck`'s wait for a worker of its model that is not there.
    report = Reclaimer(settings, store, clock=lambda: utcnow() + timedelta(hours=2)).once()
    assert report.orphaned == 2
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    assert queued_images(client, q.queue_for(lost.route)) == 2  # re-sent to its own model's queue (one group)
    assert len(client.lrange(q.queue_for(stuck.route), 0, -1)) == 2  # untouched
    store.close()
