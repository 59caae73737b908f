"""Many models on one farm: a run reaches only workers that hold its model (issue 18).

Real Redis (the test's own), real PostgreSQL, real `celery -A workers worker` processes:
- two models, one pinned worker each and one unpinned worker: both runs finish with no message handed
  back, the unpinned worker loads each model at most once, and the export equals `stage-a run`;
- a LoRA adapter's run is served by a worker holding its base, without loading anything more;
- a drifted copy (same path, same size, same first MiB, other bytes after it) is refused: nothing is
  stored and status names the model the run needs and what the online workers hold;
- the same bytes at two paths are one model: a worker pinned to the other path serves the run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from support.cli import base_env, cli
from support.farm import JSONL, MISSION, Farm, farm_factory, make_tree, wait_for  # noqa: F401
from support.lora import make_adapter
from support.store import image_rows

pytestmark = pytest.mark.slow


def reference(tmp_path: Path, input_dir: Path, checkpoint: Path, name: str) -> bytes:
    out = tmp_path / f"ref-{name}"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(input_dir), "--output-dir", str(out),
                "--checkpoint", str(checkpoint), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4"],
               base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache")), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (out / JSONL).read_bytes()


def exported(farm: Farm, run_id: int, out: Path) -> bytes:
    proc = farm.export(run_id, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (out / JSONL).read_bytes()


def loads(log: str) -> list[str]:
    """The model identities a worker's log says it loaded, in order."""
    return re.findall(r"model \S+ \((\S+)\) loaded on", log)


def status(farm: Farm, run_id: int) -> str:
    proc = cli(["status", str(run_id)], farm.env(), farm.workdir)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_two_models_pinned_and_unpinned_workers_no_hand_backs(pg_url: str, farm_factory, tiny_checkpoint: Path,  # noqa: F811
                                                              other_checkpoint: Path, tmp_path: Path) -> None:
    from stage_a.checkpoint import Checkpoint

    model_a, model_b = Checkpoint.open(other_checkpoint).identity, Checkpoint.open(tiny_checkpoint).identity
    make_tree(tmp_path / "in", groups=4, per_group=2)
    ref_a = reference(tmp_path, tmp_path / "in", other_checkpoint, "a")

    farm: Farm = farm_factory(pg_url)
    run_a = farm.enqueue(tmp_path / "in", "--checkpoint", str(other_checkpoint))
    run_b = farm.enqueue(tmp_path / "in")  # the farm's own checkpoint: model B
    pinned_a = farm.worker("pinned-a", STAGE_A_CHECKPOINT=str(other_checkpoint))
    pinned_b = farm.worker("pinned-b")
    free = farm.worker("free", unpinned=True)
    for w in (pinned_a, pinned_b, free):
        wait_for(w.ready, 120, f"worker {w.name} ready", on_timeout=farm.logs)
    farm.wait_finished(run_a, 240)
    farm.wait_finished(run_b, 240)

    store = farm.store()
    assert {r["model"] for r in image_rows(store, run_a)} == {model_a}
    assert {r["model"] for r in image_rows(store, run_b)} == {model_b}
    assert all(r["attempts"] == 1 for rid in (run_a, run_b) for r in image_rows(store, rid))
    writers = {r["worker"].split("@")[0] for rid in (run_a, run_b) for r in image_rows(store, rid)}
    store.close()
    for w in (pinned_a, pinned_b, free):
        assert "handed" not in w.log(), w.log()[-3000:]
    assert loads(pinned_a.log()) == [model_a] and loads(pinned_b.log()) == [model_b]
    free_loads = loads(free.log())
    assert len(free_loads) == len(set(free_loads)) <= 2, free_loads  # each model at most once
    assert writers <= {"pinned-a", "pinned-b", "free"}
    assert exported(farm, run_a, tmp_path / "out-a") == ref_a


def test_a_lora_run_is_served_by_its_base_models_worker_without_a_reload(
        pg_url: str, farm_factory, tiny_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    from stage_a.checkpoint import Checkpoint

    adapter = make_adapter(tiny_checkpoint, tmp_path / "lora")
    ckpt = Checkpoint.open(adapter)
    make_tree(tmp_path / "in", groups=2, per_group=2)
    ref = reference(tmp_path, tmp_path / "in", adapter, "lora")

    farm: Farm = farm_factory(pg_url)
    base_worker = farm.worker("base")  # pinned to the base model
    wait_for(base_worker.ready, 120, "worker ready", on_timeout=farm.logs)
    run_base = farm.enqueue(tmp_path / "in")
    run_lora = farm.enqueue(tmp_path / "in", "--checkpoint", str(adapter))
    farm.wait_finished(run_base, 180)
    farm.wait_finished(run_lora, 180)
    store = farm.store()
    assert {r["model"] for r in image_rows(store, run_lora)} == {ckpt.identity}
    assert {r["model"] for r in image_rows(store, run_base)} == {ckpt.base_identity}
    store.close()
    assert loads(base_worker.log()) == [ckpt.base_identity]  # loaded once, at start
    assert "handed" not in base_worker.log()
    assert exported(farm, run_lora, tmp_path / "out") == ref


def test_a_drifted_copy_at_the_same_path_is_refused(pg_url: str, farm_factory, tiny_checkpoint: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    from stage_a.checkpoint import Checkpoint

    ckpt = tmp_path / "models" / "stage-a"
    shutil.copytree(tiny_checkpoint, ckpt)
    v1 = Checkpoint.open(ckpt).identity
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url)
    run_id = farm.enqueue(tmp_path / "in", "--checkpoint", str(ckpt))

    # Version 2 copied over it: same size, same first MiB, one byte different after it.
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > (1 << 20) + 4096
    data[(1 << 20) + 4000] ^= 0x01
    weights.write_bytes(bytes(data))
    v2 = Checkpoint.open(ckpt).identity
    assert v2 != v1

    pinned = farm.worker("pinned-v2", STAGE_A_CHECKPOINT=str(ckpt))
    free = farm.worker("free", unpinned=True)
    for w in (pinned, free):
        wait_for(w.ready, 120, f"worker {w.name} ready", on_timeout=farm.logs)
    wait_for(lambda: "no worker holds model" in status(farm, run_id) and "unpinned" in status(farm, run_id),
             90, "status to name the missing model", interval=1.0, on_timeout=lambda: status(farm, run_id))
    text = status(farm, run_id)
    assert "state: stalled" in text and f"no worker holds model {v1}; online workers hold {v2}" in text, text
    assert f"{ckpt} on this host is {v2}" in text, text  # the unpinned worker's finding
    store = farm.store()
    assert all(r["status"] == "pending" and r["attempts"] == 0 and r["model"] is None
               for r in image_rows(store, run_id))
    store.close()
    assert loads(free.log()) == [] and "handed" not in pinned.log() + free.log()


def test_the_same_bytes_at_two_paths_are_one_model(pg_url: str, farm_factory, tiny_checkpoint: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    here, there = tmp_path / "host-a" / "models" / "qwen", tmp_path / "host-b" / "mnt" / "stage-a-model"
    shutil.copytree(tiny_checkpoint, here)
    shutil.copytree(tiny_checkpoint, there)
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url)
    run_id = farm.enqueue(tmp_path / "in", "--checkpoint", str(here))
    worker = farm.worker("other-path", STAGE_A_CHECKPOINT=str(there))
    wait_for(worker.ready, 120, "worker ready", on_timeout=farm.logs)
    counts = farm.wait_finished(run_id, 180)
    assert (counts.done, counts.failed) == (4, 0)
