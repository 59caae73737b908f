"""Batch planning and the prefetching loader: pure logic, no model."""

from __future__ import annotations

import threading
import time

import pytest
from support.batches import padding_fraction

from engine.prefetch import Prefetcher
from engine.scheduler import plan_batches
from stage_a.work import ImageKey, WorkItem


def _items(groups: list[int], run_id: int = 1) -> list[WorkItem]:
    return [WorkItem(ImageKey(run_id, pos, i), f"g{pos}/{i}.jpg")
            for pos, n in enumerate(groups) for i in range(1, n + 1)]


def test_per_group_batches_never_mix_groups_and_respect_size() -> None:
    items = _items([3, 5, 1, 2])
    batches = list(plan_batches(items, "per_group", batch_size=2))
    for b in batches:
        assert len(b) <= 2
        assert len({it.key.group_position for it in b}) == 1
    assert [it for b in batches for it in b] == items  # every item exactly once, order kept


def test_per_image_spans_groups_and_orders_by_cost() -> None:
    items = _items([2, 2, 2, 2])
    cost = {it.key: c for it, c in zip(items, [50, 10, 40, 20, 30, 10, 60, 20], strict=True)}
    batches = list(plan_batches(items, "per_image", batch_size=4, cost=lambda it: cost[it.key]))
    flat = [it for b in batches for it in b]
    assert sorted(flat, key=lambda it: it.key) == items
    assert [cost[it.key] for it in flat] == sorted(cost.values())
    assert any(len({it.key.group_position for it in b}) > 1 for b in batches)


def test_per_image_ordering_cuts_padding() -> None:
    items = _items([1] * 64)
    lengths = {it.key: (100 if i % 2 else 1000) + i for i, it in enumerate(items)}
    ordered = plan_batches(items, "per_image", 8, cost=lambda it: lengths[it.key])
    unordered = plan_batches(items, "per_image", 8)
    frac_ordered = padding_fraction([[lengths[it.key] for it in b] for b in ordered])
    frac_unordered = padding_fraction([[lengths[it.key] for it in b] for b in unordered])
    assert frac_ordered < frac_unordered / 2


def test_per_image_window_bounds_lookahead() -> None:
    items = _items([1] * 10)
    seen: list[ImageKey] = []

    def cost(it: WorkItem) -> int:
        seen.append(it.key)
        return -it.key.group_position

    gen = plan_batches(items, "per_image", batch_size=2, cost=cost, window_batches=2)
    first = next(gen)
    assert len(seen) == 4  # only the first window's headers were read
    assert [it.key.group_position for it in first] == [3, 2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        list(plan_batches(_items([1]), "per_group", 0))
    with pytest.raises(ValueError):
        list(plan_batches(_items([1]), "sideways", 1))


def test_prefetcher_runs_ahead_and_preserves_order() -> None:
    started: list[int] = []
    gate = threading.Event()

    def prepare(x: int) -> int:
        started.append(x)
        if x == 0:
            gate.wait(5)
        return x * 10

    with Prefetcher(prepare, range(5), depth=2) as pf:
        it = iter(pf)
        gate.set()
        first = next(it)
        deadline = time.time() + 5
        while len(started) < 3 and time.time() < deadline:
            time.sleep(0.01)
        # While the consumer holds item 0, the loader has already prepared the next ones.
        assert len(started) >= 3
        assert [first[1], *(v for _, v, _ in it)] == [0, 10, 20, 30, 40]


def test_prefetcher_hands_a_failed_source_to_the_consumer_and_goes_on() -> None:
    def prepare(x: int) -> int:
        if x == 2:
            raise RuntimeError("boom at 2")
        return x

    with Prefetcher(prepare, range(5)) as pf:
        got = list(pf)
    assert [(s, v) for s, v, _ in got] == [(0, 0), (1, 1), (2, None), (3, 3), (4, 4)]
    assert [str(e) for _, _, e in got if e] == ["boom at 2"]


def test_prefetcher_reraises_a_broken_source_in_consumer() -> None:
    def sources():  # type: ignore[no-untyped-def]
        yield 0
        raise RuntimeError("planning broke")

    got = []
    with pytest.raises(RuntimeError, match="planning broke"):
        with Prefetcher(lambda x: x, sources()) as pf:
            for item in pf:
                got.append(item[0])
    assert got == [0]
