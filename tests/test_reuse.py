"""Nightly runs pay only for what changed (issue 21): a summary already made for the same bytes, model,
prompt and options is taken instead of generated, and a run with reuse writes the JSONL a run without
it writes. In process, on the real tiny model and SQLite: the product's own local run (engine.local_run)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine import images
from engine.local_run import LocalJob, run_in_process
from merger.export import export_run
from monitor.diff import diff_runs
from producer.register import register_run
from stage_a.config import GenerationParams, RunSpec
from stage_a.settings import Settings
from stage_a.store import ResultStore

MISSION = "挡风板安装检查"
PASS, FAIL = "审核通过", "审核不通过"


def png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """An uncompressed PNG: any two of one size have the same file size (a replacement can keep it)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def make_tree(root: Path, groups: int, per_group: int = 2) -> list[Path]:
    files = []
    for g in range(groups):
        label = FAIL if g % 2 else PASS
        gid = f"QC-REUSE-20240101-{g:07d}"
        for i in range(1, per_group + 1):
            path = root / MISSION / label / gid / f"{gid}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(1000 * g + i))
            files.append(path)
    settle()
    return files


def settle() -> None:
    """Let the files written last be older than the racy window (stage_a.reuse.RACY_NS): a signature taken
    within it is not recorded, which would hide the pre-check from these tests."""
    time.sleep(0.15)


class Night:
    """One `stage-a run` of a tree into one store: whether it loaded a model, what it read, its JSONL."""

    def __init__(self, store: ResultStore, root: Path, checkpoint: Path, out: Path, settings: Settings,
                 **spec: Any) -> None:
        gen = {"max_new_tokens": 6, **{k: spec.pop(k) for k in list(spec) if k in GenerationParams.__dataclass_fields__}}
        base = RunSpec(mission=MISSION, dataset=spec.pop("dataset", "bbu"), input_root="", checkpoint=str(checkpoint),
                       batch_size=spec.pop("batch_size", 4), generation=GenerationParams(**gen), **spec)
        self.run_id = register_run(store, base, root).run_id
        self.loaded = False
        reads = images.reads.files

        def loading() -> None:
            self.loaded = True

        run_in_process(LocalJob(store.url, self.run_id, str(checkpoint), settings, "cpu"), store=store,
                       on_loading=loading)
        self.files_read = images.reads.files - reads
        report = export_run(store, self.run_id, out / str(self.run_id))
        self.jsonl = report.jsonl_path.read_bytes()
        self.counts = store.queries.counts(self.run_id)
        self.rows = {r.rel_path: r for r in _rows(store, self.run_id)}

    @property
    def generated(self) -> set[str]:
        return {p for p, r in self.rows.items() if r.status == "done" and r.reused_from is None}


def _rows(store: ResultStore, run_id: int) -> list[Any]:
    from sqlalchemy import select

    from stage_a.store.models import ImageRow

    with store.engine.connect() as c:
        return list(c.execute(select(ImageRow).where(ImageRow.run_id == run_id)).all())


@pytest.fixture()
def night(tmp_path: Path, tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    settings = Settings(cache_dir=str(tmp_path / "cache"))

    def run(root: Path, checkpoint: Path = tiny_checkpoint, settings: Settings = settings, **spec: Any) -> Night:
        return Night(store, root, checkpoint, tmp_path / "out", settings, **spec)

    run.store = store  # type: ignore[attr-defined]
    yield run
    store.close()


@pytest.mark.parametrize("precheck", [True, False])
def test_an_unchanged_tree_is_not_summarized_again(tmp_path: Path, night, precheck: bool) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    files = make_tree(root, groups=4)
    settings = Settings(cache_dir=str(tmp_path / "cache"), reuse_precheck=precheck)
    first = night(root, settings=settings)
    assert first.loaded and first.counts.done == len(files) and first.counts.reused == 0
    assert all(r.reuse_key and r.stat_key for r in first.rows.values())
    second = night(root, settings=settings)
    assert not second.loaded  # no model was even loaded
    assert second.counts.done == len(files) and second.counts.reused == len(files)
    assert second.counts.completion_tokens == 0 and not second.generated
    assert second.jsonl == first.jsonl
    # The pre-check finds an unchanged file without reading it; without it each file is hashed once.
    assert second.files_read == (0 if precheck else len(files))
    store = night.store
    assert store.queries.reuse_sources(second.run_id) == [(first.run_id, len(files))]
    third = night(root, settings=settings)  # a reused summary names the run that generated it
    assert store.queries.reuse_sources(third.run_id) == [(first.run_id, len(files))]
    d = diff_runs(store, first.run_id, third.run_id)
    assert d.same == len(files) and d.changed == d.only_a == d.only_b == 0


@pytest.mark.parametrize("precheck", [True, False])
def test_only_new_and_replaced_images_are_summarized(tmp_path: Path, night, precheck: bool) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    files = make_tree(root, groups=6)
    settings = Settings(cache_dir=str(tmp_path / "cache"), reuse_precheck=precheck)
    night(root, settings=settings)
    # A new image in a group, a photo replaced (new bytes, new mtime) and one replaced with the same size
    # and its old mtime put back: only the content (and ctime) tells it changed.
    new = files[0].parent / (files[0].stem[:-2] + "-9.png")
    new.write_bytes(png(99_001))
    replaced, sneaky = files[3], files[6]
    replaced.write_bytes(png(99_002, (80, 40)))
    st = sneaky.stat()
    sneaky.write_bytes(png(99_003))
    os.utime(sneaky, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sneaky.stat().st_size == st.st_size and sneaky.stat().st_mtime_ns == st.st_mtime_ns
    settle()
    second = night(root, settings=settings)
    assert second.generated == {str(p.relative_to(root)) for p in (new, replaced, sneaky)}
    assert second.counts.reused == len(files) - 2
    assert second.loaded
    if precheck:  # only the changed files were read (to hash, then to decode) and the new one
        assert second.files_read == 2 * 3


@pytest.mark.parametrize("mode", ["per_group", "per_image"])
def test_identical_photos_in_two_groups_are_generated_once(tmp_path: Path, night, mode: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    files = make_tree(root, groups=4)
    # A resubmission: the fail group's photos again under the pass label (and one more copy elsewhere).
    twin = root / MISSION / PASS / files[2].parent.name
    shutil.copytree(files[2].parent, twin)
    shutil.copy(files[2], files[0].parent / "copy-of-another.png")
    settle()
    n = len(files) + 3
    with_reuse = night(root, sharding_mode=mode)
    assert with_reuse.counts.done == n
    assert len(with_reuse.generated) == len(files)  # each distinct photo once
    assert with_reuse.counts.reused == 3
    assert night.store.queries.reuse_sources(with_reuse.run_id) == [(with_reuse.run_id, 3)]
    without = night(root, sharding_mode=mode, reuse="off")
    assert len(without.generated) == n and without.counts.reused == 0
    # The core invariant: a run with reuse writes the JSONL a run without it writes.
    assert with_reuse.jsonl == without.jsonl


def test_what_decides_a_summary_changes_the_key(tmp_path: Path, night, other_checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    files = make_tree(root, groups=2)
    night(root)
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).resolve().parents[1] / "stage_a" / "data", data)
    missions = data / "missions.json"
    pack = json.loads(missions.read_text(encoding="utf-8"))
    pack[MISSION]["focus"] += "（另：记录机柜门是否关闭。）"  # the mission's focus text edited in the data pack
    missions.write_text(json.dumps(pack, ensure_ascii=False), encoding="utf-8")
    for changed in (dict(checkpoint=other_checkpoint), dict(dataset="rru", max_pixels=1_048_576),
                    dict(max_pixels=524_288), dict(max_new_tokens=7), dict(repetition_penalty=1.1),
                    dict(settings=Settings(cache_dir=str(tmp_path / "cache"), data_dir=str(data)))):
        other = night(root, **changed)
        assert other.loaded and other.counts.reused == 0 and len(other.generated) == len(files), changed
    assert night(root).counts.reused == len(files)  # while the original inputs still find theirs


def test_sampled_runs_reuse_only_when_asked(tmp_path: Path, night) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    files = make_tree(root, groups=2)
    sampled = night(root, temperature=0.7)
    assert all(r.reuse_key for r in sampled.rows.values())  # recorded for a later run that asks
    again = night(root, temperature=0.7)
    assert again.counts.reused == 0 and again.loaded
    asked = night(root, temperature=0.7, reuse="on")
    assert asked.counts.reused == len(files) and not asked.loaded
    greedy = night(root)  # another decoding: its own scope
    assert greedy.counts.reused == 0
    assert night(root, reuse="off").counts.reused == 0
    assert night(root, temperature=0.00001).counts.reused == len(files)  # still greedy: the same decoding


def test_the_choice_is_recorded_with_the_run(tmp_path: Path) -> None:
    from cli.commands.options import build_spec
    from stage_a.errors import UserError

    kw = dict(mission=MISSION, prompt_profile="summary_runtime", max_new_tokens=8, temperature=0.0, top_p=1.0,
              repetition_penalty=1.05, sharding_mode="per_group", batch_size=4, max_pixels=None,
              pass_group_number=None, fail_group_number=None, sample_seed=42)
    assert build_spec({**kw, "reuse": None}, "", "").reuse == "auto"
    assert build_spec({**kw, "reuse": None}, "", "", Settings.from_env({"STAGE_A_REUSE": "off"}).reuse).reuse == "off"
    assert build_spec({**kw, "reuse": True}, "", "", "off").reuse == "on"  # --reuse
    assert build_spec({**kw, "reuse": False}, "", "").reuse == "off"  # --no-reuse
    with pytest.raises(UserError, match="STAGE_A_REUSE"):
        Settings.from_env({"STAGE_A_REUSE": "sometimes"})
    root = tmp_path / "in"
    make_tree(root, groups=1)
    store = ResultStore(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        run_id = register_run(store, build_spec({**kw, "reuse": False}, "", ""), root).run_id
        assert store.get_run(run_id).spec.reuse == "off"  # what the workers read
    finally:
        store.close()
