"""The library internals the product still reaches into have the shape the code was written against.

Each reach is kept for what bench/README.md ("Library internals") shows it buys, and its library
is pinned in pyproject.toml. When an upgrade changes one of them, a test here fails and names the
product code to re-check against the new version before updating the pin and the hash.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import pytest


def _source_hash(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def test_kombu_redis_brpop_read_is_the_one_workers_transport_copies() -> None:
    """workers/poison.py's Channel._brpop_read is kombu 5.7.0's with one call added."""
    from kombu.transport import redis as kombu_redis

    assert _source_hash(kombu_redis.Channel._brpop_read) == (
        "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f"
    ), "kombu's Channel._brpop_read changed: re-copy it into workers/poison.py"


def test_kombu_redis_restore_by_tag_is_the_one_the_reclaimer_calls() -> None:
    """stage_a/held.py restores one dead holder's message with kombu 5.7.0's QoS.restore_by_tag: under a WATCH
    on the unacked hash, removed from it and pushed back to its queue, or nothing when already gone."""
    from kombu.transport import redis as kombu_redis

    assert list(inspect.signature(kombu_redis.QoS.restore_by_tag).parameters) == ["self", "tag", "client", "leftmost"]
    assert _source_hash(kombu_redis.QoS.restore_by_tag) == (
        "58e161d81b6fe18d1fe73d53d13e6359271bcc249d0da58ee737c6775d51ceb8"
    ), "kombu's QoS.restore_by_tag changed: re-check stage_a/held.py's restore_dead_holders"


def test_celery_batches_flush_timer_is_the_one_reconnect_safe_batches_rearms() -> None:
    """workers/tasks.py's ReconnectSafeBatches replaces `_tref` and calls `_do_flush` of celery-batches 0.11."""
    from celery_batches import Batches

    assert _source_hash(Batches.Strategy) == (
        "af1dfe19ae06175f64c2c14a828314405b0f20a8531f0139a64c000b0c375628"
    ), "celery-batches' Strategy changed: does it re-arm its flush timer itself now (#108)?"
    assert _source_hash(Batches._do_flush) == (
        "f61e90f5361ea7234d73c4835cbc236de5b658cb659e4dddca953fc89bddcbd4"
    ), "celery-batches' _do_flush changed: re-check ReconnectSafeBatches"
    assert "self._tref" in inspect.getsource(Batches.__init__)


def test_celery_batches_flush_is_one_pool_call_that_reconnect_safe_batches_splits() -> None:
    """workers/tasks.py's ReconnectSafeBatches.flush calls celery-batches 0.11's flush once per share of the
    buffer: each call must be one pool call acknowledging only its own requests, and _do_flush must hand it
    every buffered request at once (hashed above), counting messages against flush_every (set out of reach)."""
    from celery_batches import Batches

    assert _source_hash(Batches.flush) == (
        "7d92a1e55b831def7c2a85f062aa2787d2377e35a6aaeb0e282f7c8647e9480f"
    ), "celery-batches' flush changed: is it still one pool call acknowledging its own requests?"
    source = inspect.getsource(Batches.Strategy)
    assert "if not next(self._count) % self.flush_every:" in source


def test_celery_consumer_hooks_have_the_parameters_workers_consumer_overrides() -> None:
    from celery.worker.consumer import Consumer

    expected = {
        "on_decode_error": ["self", "message", "exc"],
        "on_unknown_message": ["self", "body", "message"],
        "on_unknown_task": ["self", "body", "message", "exc"],
        "on_invalid_task": ["self", "body", "message", "exc"],
        "create_task_handler": ["self", "promise"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Consumer, name)).parameters) == params, name


class _Timer:
    def __init__(self) -> None:
        self.armed: list[Any] = []

    def call_repeatedly(self, interval: float, fun: Any) -> Any:
        timer = self

        class Entry:
            def cancel(self) -> None:
                if self in timer.armed:
                    timer.armed.remove(self)

        entry = Entry()
        self.armed.append(entry)
        return entry


class _Consumer:
    def __init__(self, timer: _Timer) -> None:
        from types import SimpleNamespace

        self.timer, self.hostname = timer, "probe@host"
        self.pool = SimpleNamespace(apply_async=None)  # a pool is only looked at here
        self.connection_errors: tuple[type[BaseException], ...] = ()
        self.event_dispatcher = None


def test_the_flush_timer_is_armed_again_when_the_consumer_restarts() -> None:
    """After a reconnect (Celery clears the timer and rebuilds the strategy) the interval flush is armed."""
    from workers.tasks import summarize

    task: Any = summarize
    first = _Timer()
    task.Strategy(task, task.app, _Consumer(first))
    assert len(first.armed) == 2  # the interval flush and the idle-process look
    first.armed.clear()  # Celery clears the consumer's timer when the broker connection is lost
    second = _Timer()
    task.Strategy(task, task.app, _Consumer(second))
    assert second.armed == [task._tref, task._idle_tref]


def test_a_flush_is_cut_between_messages_into_shares_of_images() -> None:
    from types import SimpleNamespace

    from workers.tasks import split_flush, summarize

    assert split_flush(list("abcde"), [10, 9, 9, 8, 7], 20) == [["a", "b"], ["c", "d"], ["e"]]
    assert split_flush(list("ab"), [40, 1], 20) == [["a"], ["b"]]  # a message of more is a piece alone
    assert split_flush(list("abc"), [1, 1, 1], 100) == [list("abc")]
    task: Any = summarize
    task._consumer = SimpleNamespace(controller=SimpleNamespace(concurrency=1))
    assert task._share(153) == 153  # one pool process: never split


class _Call:
    """A pool call as billiard returns it: ready() once the process returned."""

    def __init__(self, returned: bool) -> None:
        self.returned = returned

    def ready(self) -> bool:
        return self.returned


@pytest.mark.parametrize(("calls", "can_fetch", "waiting", "flushed"), [
    ([False, False], False, 0, False),  # both pool processes busy: the buffer waits (it can still grow)
    ([False], False, 40, True),  # one idle, the prefetch window full: nothing more can come
    ([False, True], True, 0, True),  # one returned, the queues empty: nothing more will come
    ([], True, 40, False),  # idle, but more is being fetched: wait for it (a bigger, fuller call)
])
def test_a_partial_buffer_goes_at_once_to_an_idle_process_when_waiting_brings_nothing(
        calls: list[bool], can_fetch: bool, waiting: int, flushed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from workers.tasks import summarize

    task: Any = summarize
    qos = SimpleNamespace(can_consume=lambda: can_fetch)
    task._consumer = SimpleNamespace(controller=SimpleNamespace(concurrency=2),
                                     task_consumer=SimpleNamespace(channel=SimpleNamespace(qos=qos)))
    task._calls = [_Call(r) for r in calls]
    done: list[bool] = []
    monkeypatch.setattr(task, "_waiting", lambda: waiting)
    monkeypatch.setattr(task, "_do_flush", lambda: done.append(True))
    monkeypatch.setattr(task, "_buffered", 24)
    task._flush_if_idle()
    assert bool(done) == flushed
    monkeypatch.setattr(task, "_buffered", 0)
    done.clear()
    task._flush_if_idle()
    assert not done  # an empty buffer is never flushed
