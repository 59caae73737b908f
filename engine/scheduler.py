"""Choosing batches (never touches the model): per_group keeps groups apart, per_image packs by length."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from stage_a.work import WorkItem

# per_image sorts inside windows of this many batches: close to a global sort for padding,
# while a million-image run never needs every image header read up front.
SORT_WINDOW_BATCHES = 64


def plan_batches(
    items: Iterable[WorkItem],
    mode: str,
    batch_size: int,
    cost: Callable[[WorkItem], int] | None = None,
    window_batches: int = SORT_WINDOW_BATCHES,
) -> Iterator[list[WorkItem]]:
    """Yield batches of at most ``batch_size`` items: per_group never mixes groups; per_image orders
    each window's items by ``cost`` (vision tokens), so a batch's prompts are of similar length."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if mode == "per_group":
        for _, group in itertools.groupby(items, key=lambda it: (it.key.run_id, it.key.group_position)):
            members = list(group)
            for i in range(0, len(members), batch_size):
                yield members[i:i + batch_size]
    elif mode == "per_image":
        iterator = iter(items)
        while window := list(itertools.islice(iterator, batch_size * window_batches)):
            if cost is not None:
                costs = {it.key: cost(it) for it in window}
                window.sort(key=lambda it: (costs[it.key], it.key))
            for i in range(0, len(window), batch_size):
                yield window[i:i + batch_size]
    else:
        raise ValueError(f"unknown sharding mode {mode!r}")

