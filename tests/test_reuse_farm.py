"""Reuse on the farm (issue 21): workers take summaries the store already holds exactly as `stage-a run`
does, whichever of them generated it, and the JSONL is the same byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import FAIL, JSONL, MISSION, PASS, farm_factory, make_tree  # noqa: F401

pytestmark = pytest.mark.slow


def _run(tmp: Path, tree: Path, checkpoint: Path, out: Path, db: str, *extra: str) -> str:
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(checkpoint),
                "--output-dir", str(out), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4",
                "--sharding-mode", "per_image", "--db", db, *extra],
               base_env(STAGE_A_CACHE_DIR=str(tmp / "cache")), tmp, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


def test_farm_and_run_reuse_each_others_summaries(tmp_path: Path, tiny_checkpoint: Path, farm_factory,  # type: ignore[no-untyped-def]  # noqa: F811
                                                   pg_url: str) -> None:
    tree = tmp_path / "input"
    make_tree(tree, groups=4, per_group=2)
    fail_group = next((tree / MISSION / FAIL).iterdir())
    shutil.copytree(fail_group, tree / MISSION / PASS / fail_group.name)  # a resubmission: the same photos
    n_images = 10
    farm = farm_factory(pg_url, STAGE_A_FLUSH_SIZE="4")
    farm.worker("gpu0")
    first = farm.enqueue(tree)
    farm.wait_finished(first, 240)
    assert farm.export(first, tmp_path / "farm1").returncode == 0
    store = farm.store()
    try:
        c = store.queries.counts(first)
        assert c.done == n_images and c.reused == 2  # the resubmitted photos were generated once
        # `stage-a run` on the same store takes every summary the farm made and loads no model.
        _run(tmp_path, tree, tiny_checkpoint, tmp_path / "run", pg_url)
        second = store.latest_run(MISSION)
        assert second is not None and second.id != first
        assert store.queries.counts(second.id).reused == n_images
        assert (tmp_path / "run" / JSONL).read_bytes() == (tmp_path / "farm1" / JSONL).read_bytes()
        # The farm again: every image taken from the first run (a reused summary names its generator).
        third = farm.enqueue(tree, "--new-run")
        farm.wait_finished(third, 240)
        assert store.queries.counts(third).reused == n_images
        assert store.queries.reuse_sources(third) == [(first, n_images)]
        assert farm.export(third, tmp_path / "farm3").returncode == 0
        assert (tmp_path / "farm3" / JSONL).read_bytes() == (tmp_path / "farm1" / JSONL).read_bytes()
        status = cli(["status", str(third)], farm.env(), tmp_path)
        assert f"reused: {n_images} of {n_images} done images (from run {first}: {n_images})" in status.stdout, status
    finally:
        store.close()
    # And a run that reuses nothing writes the same bytes (the core invariant under greedy float32).
    _run(tmp_path, tree, tiny_checkpoint, tmp_path / "fresh", f"sqlite:///{tmp_path / 'fresh.db'}", "--no-reuse")
    assert (tmp_path / "fresh" / JSONL).read_bytes() == (tmp_path / "farm1" / JSONL).read_bytes()
