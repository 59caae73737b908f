from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.discovery import Group
from producer.sampling import sample_groups
from stage_a.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def make_groups(n_fail: int = 30, n_pass: int = 40) -> list[Group]:
    fail = [Group(f"QC-{i:03d}", "fail", (f"m/审核不通过/QC-{i:03d}/1.jpg",)) for i in range(n_fail)]
    # Resubmissions: pass ids overlap the fail ids.
    pas = [Group(f"QC-{i:03d}", "pass", (f"m/审核通过/QC-{i:03d}/1.jpg",)) for i in range(n_pass)]
    return fail + pas


def ids(groups: list[Group], label: str | None = None) -> list[str]:
    return [g.group_id for g in groups if label is None or g.label == label]


def test_deterministic_same_seed() -> None:
    gs = make_groups()
    a = sample_groups(gs, 7, 5, seed=42)
    b = sample_groups(gs, 7, 5, seed=42)
    assert a == b
    assert len(ids(a, "pass")) == 7 and len(ids(a, "fail")) == 5


_SNIPPET = """
import json
from producer.discovery import Group
from producer.sampling import sample_groups
from tests.test_sampling import make_groups
print(json.dumps([[g.group_id, g.label] for g in sample_groups(make_groups(), 7, 5, seed=42)]))
"""


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_deterministic_across_processes(hashseed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _SNIPPET], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    here = [[g.group_id, g.label] for g in sample_groups(make_groups(), 7, 5, seed=42)]
    assert json.loads(out) == here


def test_none_keeps_all_and_zero_keeps_none() -> None:
    gs = make_groups()
    assert sample_groups(gs, None, None) == gs
    assert sample_groups(gs, 0, None) == [g for g in gs if g.label == "fail"]
    assert sample_groups(gs, None, 0) == [g for g in gs if g.label == "pass"]
    assert sample_groups(gs, 0, 0) == []


def test_cap_at_or_over_size_keeps_all() -> None:
    gs = make_groups(30, 40)
    assert sample_groups(gs, 40, 30) == gs
    assert sample_groups(gs, 1000, 31) == gs


def test_relative_order_kept() -> None:
    gs = make_groups()
    out = sample_groups(gs, 10, 10, seed=7)
    positions = [gs.index(g) for g in out]
    assert positions == sorted(positions)
    assert [g.label for g in out] == ["fail"] * 10 + ["pass"] * 10


def test_labels_independent() -> None:
    gs = make_groups()
    base = ids(sample_groups(gs, 10, 5), "pass")
    for fail_cap in (None, 0, 1, 12, 29):
        assert ids(sample_groups(gs, 10, fail_cap), "pass") == base
    fail_base = ids(sample_groups(gs, 3, 8), "fail")
    for pass_cap in (None, 0, 20):
        assert ids(sample_groups(gs, pass_cap, 8), "fail") == fail_base


def test_labels_not_sampled_alike() -> None:
    # Same ids under both labels: the per-label seeds must not pick the same positions.
    gs = make_groups(40, 40)
    out = sample_groups(gs, 10, 10)
    assert ids(out, "pass") != ids(out, "fail")


def test_different_seeds_differ() -> None:
    gs = make_groups()
    picks = {tuple(ids(sample_groups(gs, 10, 10, seed=s))) for s in range(5)}
    assert len(picks) == 5


def test_sample_is_subset_without_duplicates() -> None:
    gs = make_groups()
    out = sample_groups(gs, 15, 15, seed=3)
    assert len(set(out)) == len(out) == 30
    assert all(g in gs for g in out)


def test_negative_cap_is_user_error() -> None:
    gs = make_groups()
    with pytest.raises(UserError, match="pass"):
        sample_groups(gs, -1, None)
    with pytest.raises(UserError, match="fail"):
        sample_groups(gs, None, -2)


def test_pinned_selection() -> None:
    # Pins the algorithm: a change here silently changes every user's sampled data set.
    gs = make_groups(10, 10)
    out = sample_groups(gs, 3, 2, seed=42)
    assert [(g.group_id, g.label) for g in out] == PINNED


PINNED = [("QC-005", "fail"), ("QC-009", "fail"), ("QC-005", "pass"), ("QC-006", "pass"), ("QC-008", "pass")]
