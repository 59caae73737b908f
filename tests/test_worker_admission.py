"""Worker admission and serving, without a broker: buffers of payloads against the real PostgreSQL.

The farm's correctness rules on the worker side (issue 11), each proven here on a real store with
the real tiny model where a model runs:
- a worker serves exactly the model a run names (pinned: hands other runs back without counting an
  attempt, and backs off; unpinned: loads the run's checkpoint, refuses another file at its path);
- the store, not the message, decides which file a key is (a mismatching path is a dead letter);
- an image that can never succeed (symlink escaping the root, input root outside
  STAGE_A_INPUT_ROOTS) is failed with its reason, so the run finishes and the report names it;
- one bad payload is one dead letter, and the rest of its buffer is processed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import read_jsonl
from support.farm import FAILURES, MISSION, make_tree
from support.queues import clear, payload_keys
from support.store import dead_letters, image_rows
from support.store import store_id_of as sid

from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.messages import group_payload, image_payload
from stage_a.settings import Settings
from stage_a.store import ResultStore
from stage_a.work import ImageKey, WorkItem
from workers.runtime import WorkerRuntime

REDIS_URL = os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def register(db_url: str, input_dir: Path, checkpoint: Path | None, mode: str = "per_image") -> tuple[int, list[WorkItem]]:
    from producer.register import register_run

    store = ResultStore(db_url)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", batch_size=4, sharding_mode=mode,
                   checkpoint=str(checkpoint) if checkpoint else "", generation=GenerationParams(max_new_tokens=4))
    run_id = register_run(store, spec, input_dir, farm=True).run_id
    items = store.unfinished_items(run_id)
    store.close()
    return run_id, items


@pytest.fixture()
def queue() -> Iterator[str]:
    """A queue name of this test on the shared Redis (handed-back messages land there)."""
    import redis

    name = f"stage_a_adm_{uuid.uuid4().hex[:10]}"
    yield name
    clear(redis.Redis.from_url(REDIS_URL), name)


def queued(queue: str) -> list[dict[str, Any]]:
    """The payloads waiting on ``queue`` (a per-model queue's full name, or the plain one), oldest first."""
    import base64

    import redis

    out = []
    for raw in reversed(redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)):
        env = json.loads(raw)
        out.append(json.loads(base64.b64decode(env["body"]))[0][0])
    return out


def runtime(db_url: str, queue: str = "stage_a_unused", **kw: Any) -> WorkerRuntime:
    settings = Settings(database_url=db_url, broker_url=REDIS_URL, queue=queue, device="cpu", **kw)
    rt = WorkerRuntime(settings, name="test-worker:1")
    rt.sleep = lambda s: None
    return rt


def rows_by_key(store: ResultStore, run_id: int) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["group_position"], r["image_index"]): r for r in image_rows(store, run_id)}


# ---- item 1: the run's model, and only it -------------------------------------------------------


def test_pinned_worker_hands_other_models_runs_back_then_their_worker_serves_them(
        pg_url: str, tiny_checkpoint: Path, other_checkpoint: Path, queue: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=2, per_group=2)
    run_id, items = register(pg_url, tmp_path / "in", other_checkpoint)
    demo_run, demo_items = register(pg_url, tmp_path / "in", None)
    payloads = [image_payload(it, sid(pg_url)) for it in items] + [image_payload(demo_items[0], sid(pg_url))]

    pinned = runtime(pg_url, queue, checkpoint=str(tiny_checkpoint))
    slept: list[float] = []
    pinned.sleep = slept.append
    for _ in range(4):
        admitted = pinned.process(payloads).admitted
        assert admitted.work == {} and len(admitted.handed_back) == 5
    # Never served: no model loaded, no lease, no attempt counted, nothing recorded.
    assert pinned.host.engine is None
    for rid in (run_id, demo_run):
        assert all(r["status"] == "pending" and r["attempts"] == 0 and r["model"] is None
                   for r in image_rows(pinned.store, rid))
    # Handed back to the queues of their models (every round) and backing off longer each time, capped.
    route = Checkpoint.open(other_checkpoint).base_identity
    assert queued(f"{queue}.{route}")[:4] == payloads[:4] and queued(f"{queue}.demo")[:1] == payloads[4:]
    assert slept == [0.25, 0.5, 1.0, 2.0]

    unpinned = runtime(pg_url, queue)  # no STAGE_A_CHECKPOINT: loads the run's checkpoint
    admitted = unpinned.process([image_payload(it, sid(pg_url)) for it in items]).admitted
    assert sum(len(v) for v in admitted.work.values()) == 4 and not admitted.handed_back
    want = Checkpoint.open(other_checkpoint).identity
    assert unpinned.host.serving == want
    rows = image_rows(unpinned.store, run_id)
    assert all(r["status"] == "done" and r["model"] == want and r["engine"] == "transformers" for r in rows)
    assert want != Checkpoint.open(tiny_checkpoint).identity
    # Their heartbeats say which kind each is (status counts an unpinned worker for any run).
    unpinned.rename("test-worker:2")
    pinned.heartbeats.beat("ready")
    unpinned.heartbeats.beat("ready")
    assert {b.name: b.pinned for b in pinned.store.queries.worker_beats()} == {"test-worker:1": True, "test-worker:2": False}
    pinned.store.close()
    unpinned.store.close()


def test_unpinned_worker_refuses_another_model_at_the_runs_checkpoint_path(
        pg_url: str, tiny_checkpoint: Path, queue: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=1, per_group=2)
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, ckpt)
    run_id, items = register(pg_url, tmp_path / "in", ckpt)
    # Someone replaces the model at that path after the run was enqueued.
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (ckpt / "config.json").write_text(json.dumps(config))

    rt = runtime(pg_url, queue)
    processed = rt.process([image_payload(it, sid(pg_url)) for it in items])
    assert processed.admitted.work and rt.host.engine is None  # admitted, but the model check refused it
    assert [o.kind for o in processed.outcomes] == ["refused", "refused"]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in image_rows(rt.store, run_id))
    # Not handed back: the queue it came from is this worker's own, so that would loop; the images wait for
    # the reclaimer (and a worker where the path holds the run's model), and the worker says why.
    route = rt.store.get_run(run_id).route
    assert queued(f"{queue}.{route}") == [] and queued(queue) == []
    rt.store.close()


def test_a_checkpoint_replaced_while_it_loads_serves_nothing(pg_url: str, tiny_checkpoint: Path,
                                                             other_checkpoint: Path, queue: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.hosting

    make_tree(tmp_path / "in", groups=1, per_group=2)
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, ckpt)
    run_id, items = register(pg_url, tmp_path / "in", ckpt)
    want = Checkpoint.open(ckpt).identity
    real_build = engine.hosting.build_engine

    def build_while_replaced(checkpoint: str, device: str, kind: str = "transformers") -> Any:
        # The model check has passed; then the folder is overwritten with another model as it loads.
        for f in other_checkpoint.iterdir():
            shutil.copy(f, ckpt / f.name)
        return real_build(checkpoint, device, kind)

    monkeypatch.setattr(engine.hosting, "build_engine", build_while_replaced)
    rt = runtime(pg_url, queue)
    rt.process([image_payload(it, sid(pg_url)) for it in items])
    rows = image_rows(rt.store, run_id)
    assert all(r["status"] == "pending" and r["model"] is None for r in rows), \
        [(r["status"], r["model"], want) for r in rows]
    assert rt.host.engine is None
    assert sorted(k for p in queued(f"{queue}.{want}") for k in payload_keys(p)) == [(0, 1), (0, 2)]
    rt.store.close()

    # A pinned worker whose folder changes while it loads at start refuses to serve at all.
    shutil.rmtree(ckpt)
    shutil.copytree(tiny_checkpoint, ckpt)
    pinned = runtime(pg_url, queue, checkpoint=str(ckpt))
    with pytest.raises(UserError, match="changed while it was loading"):
        pinned.host.preload()
    assert pinned.host.engine is None
    pinned.store.close()


# ---- item 2: the store decides the file ----------------------------------------------------------


def test_a_key_with_another_images_path_never_stores_that_images_summary(pg_url: str, tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=2, per_group=2)
    run_id, items = register(pg_url, tmp_path / "in", tiny_checkpoint)
    k01, k02, k11 = items[0], items[1], items[2]
    forged = {**image_payload(k01, sid(pg_url)), "path": k11.rel_path}  # valid key, another group's image
    forged_group = group_payload([k01, WorkItem(k02.key, k11.rel_path)], sid(pg_url))

    rt = runtime(pg_url, checkpoint=str(tiny_checkpoint))
    admitted = rt.process([forged, forged_group, image_payload(k11, sid(pg_url))]).admitted
    assert admitted.dead == 2
    rows = rows_by_key(rt.store, run_id)
    assert rows[(0, 1)]["status"] == "pending" and rows[(0, 1)]["summary"] is None
    assert rows[(0, 2)]["status"] == "pending" and rows[(0, 2)]["summary"] is None
    assert rows[(1, 1)]["status"] == "done"
    letters = dead_letters(rt.store)
    assert len(letters) == 2 and all("does not match the stored path" in r for r, _ in letters), letters

    # The honest messages then summarize each key from its own file.
    rt.process([image_payload(k01, sid(pg_url)), image_payload(k02, sid(pg_url))])
    rows = rows_by_key(rt.store, run_id)
    assert rows[(0, 1)]["status"] == rows[(0, 2)]["status"] == "done"
    assert rows[(0, 1)]["rel_path"] == k01.rel_path
    rt.store.close()


# ---- item 4: images that can never succeed fail, the run finishes ----------------------------------


def _export_failures(db_url: str, run_id: int, out: Path) -> list[dict[str, Any]]:
    from merger.export import export_run

    store = ResultStore(db_url)
    try:
        export_run(store, run_id, out)
    finally:
        store.close()
    return read_jsonl(out / FAILURES)


def test_symlink_escaping_the_root_fails_the_image_and_the_run_finishes(pg_url: str, tiny_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    from workers.reclaimer import Reclaimer

    groups = make_tree(tmp_path / "in", groups=2, per_group=2)
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(next((tmp_path / "in").rglob("*.jpg")), secret)
    fail_group = tmp_path / "in" / MISSION / "审核不通过" / groups[0][0]
    os.symlink(secret, fail_group / f"{groups[0][0]}-3.jpg")  # discovery follows links: registered
    run_id, items = register(pg_url, tmp_path / "in", tiny_checkpoint)
    assert len(items) == 5

    rt = runtime(pg_url, checkpoint=str(tiny_checkpoint))
    admitted = rt.process([image_payload(it, sid(pg_url)) for it in items]).admitted
    assert len(admitted.failed) == 1
    counts = rt.store.queries.counts(run_id)
    assert counts.finished and (counts.done, counts.failed) == (4, 1)
    row = rows_by_key(rt.store, run_id)[(0, 3)]
    assert row["status"] == "failed" and "path leaves the input root" in row["error"]
    assert [r for r, _ in dead_letters(rt.store)] == [f"image {ImageKey(run_id, 0, 3)}: {row['error']}"]
    # The reclaimer has nothing to re-send, ever.
    assert [it for it in rt.store.orphaned_pending(0) if it.key.run_id == run_id] == []
    assert Reclaimer(rt.settings, rt.store).store.stale_leases() == []

    failures = _export_failures(pg_url, run_id, tmp_path / "out")
    assert [(f["group_id"], f["status"]) for f in failures] == [(groups[0][0], "failed")]
    assert failures[0]["images"] == [{"image": "image_3", "file": f"{groups[0][0]}-3.jpg", "reason": row["error"]}]
    rt.store.close()


def test_input_root_outside_the_allowed_roots_fails_every_image(pg_url: str, tiny_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    groups = make_tree(tmp_path / "in", groups=2, per_group=2)
    run_id, items = register(pg_url, tmp_path / "in", tiny_checkpoint, mode="per_group")
    allowed = tmp_path / "allowed"
    allowed.mkdir()

    rt = runtime(pg_url, checkpoint=str(tiny_checkpoint), input_roots=(str(allowed),))
    admitted = rt.process([group_payload(items[:2], sid(pg_url)), group_payload(items[2:], sid(pg_url))]).admitted
    assert len(admitted.failed) == 4 and admitted.work == {}
    assert rt.host.engine is None  # nothing to serve: no model was even loaded
    counts = rt.store.queries.counts(run_id)
    assert counts.finished and counts.failed == 4
    assert len(dead_letters(rt.store)) == 2  # one per message, naming the reason
    failures = _export_failures(pg_url, run_id, tmp_path / "out")
    assert [f["group_id"] for f in failures] == [g for g, _ in groups]
    assert all("is outside STAGE_A_INPUT_ROOTS" in img["reason"] for f in failures for img in f["images"])
    rt.store.close()


# ---- item 6: one bad payload is one dead letter, the rest of the buffer is processed --------------


def test_bad_payloads_are_each_one_dead_letter_and_the_buffer_goes_on(pg_url: str, tiny_checkpoint: Path,
                                                                      tmp_path: Path) -> None:
    make_tree(tmp_path / "in", groups=2, per_group=2)
    run_id, items = register(pg_url, tmp_path / "in", tiny_checkpoint)
    good = image_payload(items[0], sid(pg_url))
    too_many = {"v": 1, "run_id": run_id, "group_position": 1,
                "images": [{"image_index": i, "path": f"QC-x-{i}.jpg"} for i in range(1, 5001)]}
    bad: list[tuple[Any, str]] = [
        ({**good, "path": "a\x00b.jpg"}, "field 'path' contains control characters"),
        ({**good, "run_id": 2**40}, "field 'run_id' is out of range (at most 2147483647)"),
        ({**good, "run_id": -1}, "field 'run_id' must be a non-negative integer, got -1"),
        ({**good, "run_id": True}, "field 'run_id' must be a non-negative integer, got True"),
        ({**good, "group_position": 2**63}, "field 'group_position' is out of range"),
        (too_many, f"is not in run {run_id} (nor 4997 more of its 5000)"),
        ({"run_id": run_id, "group_position": 0, "images": "x"}, "field 'images' must be a non-empty list"),
        ({"run_id": run_id, "group_position": 0, "images": [1]}, "each entry of 'images' must be an object"),
        ([good], "payload must be a JSON object"),
        (None, "payload must be a JSON object"),
        ({**good, "run_id": 999_999}, "unknown run 999999"),
    ]
    buffer = [p for p, _ in bad[:3]] + [image_payload(items[0], sid(pg_url)), image_payload(items[1], sid(pg_url))] + \
        [p for p, _ in bad[3:]] + [image_payload(it, sid(pg_url)) for it in items[2:]]

    rt = runtime(pg_url, checkpoint=str(tiny_checkpoint))
    admitted = rt.process(buffer).admitted
    assert admitted.dead == len(bad)
    letters = dead_letters(rt.store)
    assert len(letters) == len(bad), [r for r, _ in letters]
    unmatched = list(letters)
    for _payload, fragment in bad:
        hit = next((x for x in unmatched if fragment in x[0]), None)
        assert hit is not None, (fragment, [r for r, _ in unmatched])
        unmatched.remove(hit)
        assert hit[1] and "\x00" not in hit[1]
    counts = rt.store.queries.counts(run_id)
    assert counts.finished and counts.done == 4, counts
    rt.store.close()


# ---- chunk messages (version 2): keys the store resolves; version 1 still served ------------------


def test_chunks_run_by_the_stored_paths_and_v1_messages_alongside(pg_url: str, tiny_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    from stage_a.messages import chunk_payload, payloads_for

    make_tree(tmp_path / "in", groups=4, per_group=2)
    run_id, items = register(pg_url, tmp_path / "in", tiny_checkpoint)
    chunks = list(payloads_for(items[:6], "per_image", sid(pg_url)))
    assert all("path" not in str(p) for p in chunks)
    v1 = [image_payload(it, sid(pg_url)) for it in items[6:]]
    bad = [
        ({**chunk_payload([items[0].key], sid(pg_url)), "keys": [[0, "1"]]}, "must be a non-negative integer"),
        ({**chunk_payload([items[0].key], sid(pg_url)), "path": "../../etc/passwd"}, "unknown field 'path'"),
        (chunk_payload([ImageKey(run_id, 99, 1), ImageKey(run_id, 98, 1)], sid(pg_url)),
         f"image ImageKey(run_id={run_id}, group_position=99, image_index=1) is not in run {run_id} (nor 1 more"),
    ]
    rt = runtime(pg_url, checkpoint=str(tiny_checkpoint))
    processed = rt.process([*chunks, bad[0][0], *v1, bad[1][0], bad[2][0]])
    assert processed.admitted.dead == 3 and processed.images == 8
    assert [o.kind for o in processed.outcomes] == ["done"] * len(chunks) + ["rejected", "done", "done",
                                                                            "rejected", "rejected"]
    rows = rows_by_key(rt.store, run_id)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values()), rows
    letters = [reason for reason, _ in dead_letters(rt.store)]
    for _, fragment in bad:
        assert any(fragment in r for r in letters), (fragment, letters)
    # A chunk delivered again after part of it finished runs only what is left (nothing here).
    again = rt.process(chunks)
    assert again.images == 0 and {o.kind for o in again.outcomes} == {"skipped"}
    rt.store.close()
