"""Cap how many pass / fail groups are kept (SPEC section 7).

Reproducibility on every machine and Python version: each label gets its own
``random.Random(f"{seed}:{label}")``. String seeds are hashed with SHA-512 (seed version 2), so they
ignore PYTHONHASHSEED, and only ``Random.random()`` is used: Python guarantees that method's
sequence for a given seed across versions, unlike ``sample``/``shuffle``. Every group draws one
key in input order and the ``cap`` smallest keys (ties: the lower index) are kept, which is a
uniform sample.

``sample_stream`` does the same on a stream of groups: a label without a cap passes straight
through; a capped label is spooled to a temporary file (one pickled group at a time) until its
count is known, then replayed, keeping the chosen ones. Memory holds one float per group of the
label, never the groups themselves.
"""

from __future__ import annotations

import pickle
import random
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from typing import IO

from producer.discovery import Group
from stage_a.errors import UserError

_BUCKETS = 1 << 16
"""Histogram buckets over [0, 1) used to find the cap-th smallest key without sorting them all."""


def chosen_mask(count: int, cap: int, rng: random.Random) -> bytearray:
    """mask[i] == 1 for the indices (0..count-1) of a uniform sample of ``cap`` items: those whose
    (key, index) is among the ``cap`` smallest, key = the i-th ``rng.random()``.

    Equal to sorting every (key, index) and taking the first ``cap`` (tests/test_sampling.py), in
    9 bytes per item: the keys are bucketed by value and only the bucket holding the cap-th
    smallest is sorted."""
    keys = array("d", (rng.random() for _ in range(count)))
    if cap >= count:
        return bytearray(b"\x01") * count
    if cap <= 0:
        return bytearray(count)
    hist = [0] * _BUCKETS
    for k in keys:
        hist[int(k * _BUCKETS)] += 1  # exact: a power-of-two scale keeps the order of floats
    below = 0
    edge = 0
    while below + hist[edge] < cap:
        below += hist[edge]
        edge += 1
    in_edge = sorted((k, i) for i, k in enumerate(keys) if int(k * _BUCKETS) == edge)
    last = in_edge[cap - below - 1]  # the cap-th smallest (key, index)
    mask = bytearray(count)
    for i, k in enumerate(keys):
        b = int(k * _BUCKETS)
        if b < edge or (b == edge and (k, i) <= last):
            mask[i] = 1
    return mask


def _check_caps(pass_cap: int | None, fail_cap: int | None) -> dict[str, int | None]:
    caps = {"pass": pass_cap, "fail": fail_cap}
    for label, cap in caps.items():
        if cap is not None and cap < 0:
            raise UserError(f"{label}_group_number must be >= 0 (or unset to keep all), got {cap}")
    return caps


def sample_groups(
    groups: Sequence[Group], pass_cap: int | None, fail_cap: int | None, seed: int = 42
) -> list[Group]:
    """Keep at most ``pass_cap`` pass and ``fail_cap`` fail groups, in their input order.

    None keeps all, 0 keeps none. Labels are sampled independently: changing one cap never
    changes which groups of the other label are kept.
    """
    caps = _check_caps(pass_cap, fail_cap)
    by_label: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_label.setdefault(g.label, []).append(i)

    keep: set[int] = set()
    for label, idx in by_label.items():
        cap = caps.get(label)  # an unknown label has no cap: keep it all
        if cap is None or cap >= len(idx):
            keep.update(idx)
        elif cap > 0:
            mask = chosen_mask(len(idx), cap, random.Random(f"{seed}:{label}"))
            keep.update(idx[j] for j in range(len(idx)) if mask[j])
    return [g for i, g in enumerate(groups) if i in keep]


class SampledStream:
    """``sample_groups`` over a stream whose labels come in contiguous runs (discovery's order).

    Iterate it once; ``found`` (groups seen) and ``kept`` are complete after the last one."""

    def __init__(self, groups: Iterable[Group], pass_cap: int | None, fail_cap: int | None,
                 seed: int = 42) -> None:
        self._groups = groups
        self.caps = _check_caps(pass_cap, fail_cap)
        self._seed = seed
        self.found = 0
        self.kept = 0

    def __iter__(self) -> Iterator[Group]:
        seen: set[str] = set()
        for label, run in groupby(self._groups, key=lambda g: g.label):
            if label in seen:
                raise ValueError(f"label {label!r} comes back after another label: the stream is not in output order")
            seen.add(label)
            cap = self.caps.get(label)
            if cap is None:
                for g in run:
                    self.found += 1
                    self.kept += 1
                    yield g
            elif cap == 0:
                self.found += sum(1 for _ in run)
            else:
                yield from self._capped(label, run, cap)

    def _capped(self, label: str, run: Iterable[Group], cap: int) -> Iterator[Group]:
        with tempfile.TemporaryFile(prefix="stage-a-sample-") as spool:
            count = 0
            for g in run:  # one pickle per group: a shared (Un)Pickler's memo would keep every group
                pickle.dump(g, spool, protocol=pickle.HIGHEST_PROTOCOL)
                count += 1
            self.found += count
            mask = chosen_mask(count, cap, random.Random(f"{self._seed}:{label}"))
            spool.seek(0)
            for i, g in enumerate(_replay(spool, count)):
                if mask[i]:
                    self.kept += 1
                    yield g


def _replay(spool: IO[bytes], count: int) -> Iterator[Group]:
    for _ in range(count):
        yield pickle.load(spool)
