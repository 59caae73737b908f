"""Cap how many pass / fail groups are kept (SPEC section 7).

Reproducibility on every machine and Python version: each label gets its own
``random.Random(f"{seed}:{label}")``. String seeds are hashed with SHA-512 (seed version 2), so they
ignore PYTHONHASHSEED, and only ``Random.random()`` is used: Python guarantees that method's
sequence for a given seed across versions, unlike ``sample``/``shuffle``. Every group draws one
key in input order and the ``cap`` smallest keys are kept, which is a uniform sample.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from producer.discovery import Group
from stage_a.errors import UserError


def _chosen(count: int, cap: int, rng: random.Random) -> set[int]:
    """Indices (0..count-1) of a uniform sample of ``cap`` items."""
    keys = [rng.random() for _ in range(count)]
    # Index breaks (practically impossible) ties so the result never depends on sort internals.
    ranked = sorted(range(count), key=lambda i: (keys[i], i))
    return set(ranked[:cap])


def sample_groups(
    groups: Sequence[Group], pass_cap: int | None, fail_cap: int | None, seed: int = 42
) -> list[Group]:
    """Keep at most ``pass_cap`` pass and ``fail_cap`` fail groups, in their input order.

    None keeps all, 0 keeps none. Labels are sampled independently: changing one cap never
    changes which groups of the other label are kept.
    """
    caps = {"pass": pass_cap, "fail": fail_cap}
    for label, cap in caps.items():
        if cap is not None and cap < 0:
            raise UserError(f"{label}_group_number must be >= 0 (or unset to keep all), got {cap}")

    by_label: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_label.setdefault(g.label, []).append(i)

    keep: set[int] = set()
    for label, idx in by_label.items():
        cap = caps.get(label)  # an unknown label has no cap: keep it all
        if cap is None or cap >= len(idx):
            keep.update(idx)
        elif cap > 0:
            rng = random.Random(f"{seed}:{label}")
            keep.update(idx[j] for j in _chosen(len(idx), cap, rng))
    return [g for i, g in enumerate(groups) if i in keep]
