"""Which model queue an unpinned worker consumes (workers/routing.py RouteChooser), on a real store and Redis.

The rules (issue 18): keep the loaded model while its queue has messages; switch only when it has none;
prefer the model fewest other workers hold; never a model whose checkpoint at the run's path on this host
is not the run's model (named as this host's problem).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.farm import make_tree
from support.queues import clear

from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.queue import TaskQueue
from stage_a.settings import Settings
from stage_a.store import ResultStore
from workers.routing import RouteChooser

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def queue() -> Iterator[str]:
    import redis

    name = f"stage_a_route_{uuid.uuid4().hex[:8]}"
    yield name
    clear(redis.Redis.from_url(REDIS_URL), name)


def _register(store: ResultStore, input_dir: Path, checkpoint: Path) -> str:
    from producer.register import register_run

    spec = RunSpec(mission="挡风板安装检查", dataset="bbu", input_root="", batch_size=4, checkpoint=str(checkpoint),
                   generation=GenerationParams(max_new_tokens=4))
    return register_run(store, spec, input_dir, farm=True).route


def _fill(q: TaskQueue, route: str, n: int) -> None:
    q.send([{"v": 1, "run_id": 0, "group_position": 0, "image_index": i, "path": "x.jpg"} for i in range(n)],
           q.queue_for(route))


def test_keeps_its_model_while_it_has_work_then_takes_the_least_held(
        pg_url: str, queue: str, tiny_checkpoint: Path, other_checkpoint: Path, tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1, per_group=1)
    store = ResultStore(pg_url)
    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, cache_dir=str(tmp_path / "cache"))
    a, b = _register(store, tmp_path / "in", tiny_checkpoint), _register(store, tmp_path / "in", other_checkpoint)
    q = TaskQueue(settings)
    problems: list[str | None] = []
    chooser = RouteChooser(settings, store, q, problems.append, node="me@host")
    assert chooser.choose(None) is None  # routes with work, but no message waiting anywhere

    _fill(q, a, 10)
    _fill(q, b, 6)
    assert chooser.choose(None) == a  # the longest queue, nobody holds either
    _fill(q, b, 20)
    assert chooser.choose(a) == a  # B is longer now, but A still has work: no reload
    clear(q.app.connection_for_read().default_channel.client, q.queue_for(a))
    assert chooser.choose(a) == b  # A has none: switch
    assert problems[-1] is None

    store.heartbeat("other@host:1", "busy", model=b, pinned=False)
    store.heartbeat("me@host:7", "busy", model=a, pinned=False)  # this worker's own row does not count
    _fill(q, a, 15)
    assert chooser.choose(None) == a  # B: 26 messages / 2 holders = 13 < A: 15 / 1
    store.close()


def test_a_model_whose_checkpoint_differs_on_this_host_is_never_taken(
        pg_url: str, queue: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1, per_group=1)
    ckpt = tmp_path / "models" / "m"
    shutil.copytree(tiny_checkpoint, ckpt)
    store = ResultStore(pg_url)
    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, cache_dir=str(tmp_path / "cache"))
    route = _register(store, tmp_path / "in", ckpt)
    (ckpt / "generation_config.json").write_text('{"max_new_tokens": 7}')  # another model at the same path now
    q = TaskQueue(settings)
    problems: list[str | None] = []
    chooser = RouteChooser(settings, store, q, problems.append, node="me@host")
    _fill(q, route, 5)
    assert chooser.choose(None) is None
    now = Checkpoint.open(ckpt).base_identity
    assert problems[-1] is not None and f"needs model {route}, but {ckpt} on this host is {now}" in problems[-1]
    store.close()


def test_a_model_is_taken_when_some_of_its_runs_can_be_served_here(
        pg_url: str, queue: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A base run and a LoRA run share the base's queue; the adapter is missing on this host: the base's runs are
    still served, and the problem names the adapter's run only."""
    from support.lora import make_adapter

    make_tree(tmp_path / "in", groups=1, per_group=1)
    adapter = make_adapter(tiny_checkpoint, tmp_path / "lora")
    store = ResultStore(pg_url)
    settings = Settings(database_url=pg_url, broker_url=REDIS_URL, queue=queue, cache_dir=str(tmp_path / "cache"))
    base_route = _register(store, tmp_path / "in", tiny_checkpoint)
    assert _register(store, tmp_path / "in", adapter) == base_route  # adapters ride on their base's queue
    shutil.rmtree(adapter)
    q = TaskQueue(settings)
    problems: list[str | None] = []
    _fill(q, base_route, 3)
    assert RouteChooser(settings, store, q, problems.append).choose(None) == base_route
    assert problems[-1] is not None and "run 2 needs model" in problems[-1] and "run 1 " not in problems[-1]
    store.close()
