"""Enqueue streams: the fast natural key and bucketed sampling equal what they replace, registration
and publishing hold nothing per image, and a registration stopped part-way records nothing."""

from __future__ import annotations

import os
import random
import signal
import string
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from natsort import natsort_keygen
from support.queues import payload_keys

import producer.register
import stage_a.store.store as store_module
from producer.discovery import Group, _natural_key, discover
from producer.register import plan_run, register_run
from producer.sampling import SampledStream, chosen_mask, sample_groups
from stage_a.config import RunSpec
from stage_a.messages import payloads_for
from stage_a.store import GroupInput, ResultStore

REPO = Path(__file__).resolve().parents[1]
MISSION = "挡风板安装检查"
FAIL, PASS = "审核不通过", "审核通过"


def _reference_chosen(count: int, cap: int, rng: random.Random) -> set[int]:
    """The sampling every run before streaming used (SPEC section 7): sort all (key, index)."""
    keys = [rng.random() for _ in range(count)]
    ranked = sorted(range(count), key=lambda i: (keys[i], i))
    return set(ranked[:cap])


def test_natural_key_equals_natsort_on_random_names() -> None:
    natsort_key = natsort_keygen()
    rng = random.Random(7)
    alphabets = (string.printable, "0123456789", "0123456789_-.aZ ", "a0١２é_x.")  # non-ASCII goes to natsort
    for _ in range(50_000):
        alphabet = rng.choice(alphabets)
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        assert _natural_key(name) == natsort_key(name), name


def test_chosen_mask_equals_sorting_every_key() -> None:
    rng = random.Random(0)
    cases = [(count, cap) for count in (1, 2, 3, 10, 97, 1000) for cap in (1, 2, count // 2, count - 1, count)]
    cases += [(200_000, cap) for cap in (1, 65_537, 100_000, 199_999)]  # several keys per bucket
    cases += [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(200)]
    for n, (count, cap) in enumerate(cases):
        if cap < 1:
            continue
        seed = f"{n % 17}:{'pass' if n % 2 else 'fail'}"
        mask = chosen_mask(count, cap, random.Random(seed))
        assert {i for i in range(count) if mask[i]} == _reference_chosen(count, cap, random.Random(seed)), (count, cap)


def _groups(n_fail: int, n_pass: int) -> list[Group]:
    return ([Group(f"QC-{i:04d}", "fail", (f"m/{FAIL}/QC-{i:04d}/1.jpg",)) for i in range(n_fail)]
            + [Group(f"QC-{i:04d}", "pass", (f"m/{PASS}/QC-{i:04d}/1.jpg", f"m/{PASS}/QC-{i:04d}/2.jpg"))
               for i in range(n_pass)])


def _reference_sample(groups: list[Group], pass_cap: int | None, fail_cap: int | None, seed: int) -> list[Group]:
    caps = {"pass": pass_cap, "fail": fail_cap}
    keep: set[int] = set()
    for label in ("fail", "pass"):
        idx = [i for i, g in enumerate(groups) if g.label == label]
        cap = caps[label]
        if cap is None or cap >= len(idx):
            keep.update(idx)
        elif cap > 0:
            keep.update(idx[j] for j in _reference_chosen(len(idx), cap, random.Random(f"{seed}:{label}")))
    return [g for i, g in enumerate(groups) if i in keep]


def test_sampling_list_and_stream_equal_the_reference_over_seeds_and_sizes() -> None:
    rng = random.Random(3)
    for _ in range(150):
        groups = _groups(rng.randint(0, 300), rng.randint(0, 300))
        caps = [None, 0, 1, rng.randint(1, 320)]
        pass_cap, fail_cap, seed = rng.choice(caps), rng.choice(caps), rng.randint(0, 10**6)
        want = _reference_sample(groups, pass_cap, fail_cap, seed)
        assert sample_groups(groups, pass_cap, fail_cap, seed) == want
        stream = SampledStream(iter(groups), pass_cap, fail_cap, seed)
        assert list(stream) == want
        assert (stream.found, stream.kept) == (len(groups), len(want))


def _tree(root: Path, rng: random.Random) -> None:
    """A varied mission tree: names needing natural order, resubmissions, empty and stray entries."""
    for label_dir in (FAIL, PASS):
        for g in rng.sample(range(400), rng.randint(5, 60)):
            folder = root / MISSION / label_dir / f"QC-T-2024{g:04d}"
            folder.mkdir(parents=True)
            for i in rng.sample(range(1, 30), rng.randint(0, 6)):
                ext = rng.choice([".jpg", ".JPG", ".png", ".jpeg", ".txt"])
                (folder / f"x_{i}{ext}").touch()
                if rng.random() < 0.2:
                    (folder / f"x_{i:02d}b{ext}").touch()
    (root / MISSION / PASS / "stray.jpg").touch()


def _registered(store: ResultStore, run_id: int) -> list[Group]:
    from sqlalchemy import text

    with store.engine.connect() as c:
        groups = c.execute(text("SELECT position, group_id, label, n_images FROM groups WHERE run_id = :r "
                                "ORDER BY position"), {"r": run_id}).all()
        images = c.execute(text("SELECT group_position, image_index, rel_path FROM images WHERE run_id = :r "
                                "ORDER BY group_position, image_index"), {"r": run_id}).all()
    paths: dict[int, list[str]] = {}
    for pos, index, path in images:
        assert index == len(paths.setdefault(pos, [])) + 1
        paths[pos].append(path)
    assert [len(paths[pos]) for pos, *_ in groups] == [n for *_, n in groups]
    return [Group(gid, label, tuple(paths[pos])) for pos, gid, label, _ in groups]


def test_streamed_registration_records_what_the_plan_lists(tmp_path: Path, pg_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_REGISTER_CHUNK", 7)  # many chunk boundaries
    store = ResultStore(pg_url)
    rng = random.Random(11)
    for n in range(4):
        root = tmp_path / f"t{n}"
        _tree(root, rng)
        caps = [None, 0, 3, 40]
        spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", pass_group_number=rng.choice(caps),
                       fail_group_number=rng.choice(caps[1:] if n == 0 else caps), sample_seed=rng.randint(0, 99))
        try:
            plan = plan_run(spec, root)
        except Exception as exc:  # sampling kept nothing: registration says the same and records nothing
            with pytest.raises(type(exc), match=str(exc)[:30]):
                register_run(store, spec, root, farm=True)
            continue
        want = _reference_sample(discover(root, MISSION).groups, spec.pass_group_number, spec.fail_group_number,
                                 spec.sample_seed)
        assert plan.groups == want
        reg = register_run(store, spec, root, farm=True)
        assert _registered(store, reg.run_id) == want
        info = store.get_run(reg.run_id)
        assert (info.n_groups, info.n_images) == (reg.groups, reg.images) == (len(want), plan.images)
        assert reg.discovered_groups == plan.discovered_groups
        assert [it.rel_path for it in store.iter_unfinished_items(reg.run_id, page=5)] == \
            [p for g in want for p in g.images]


def _generated(n_images: int, per_group: int = 5) -> Iterator[GroupInput]:
    for g in range(n_images // per_group):
        gid = f"QC-MEM-20240101-{g:07d}"
        yield GroupInput(gid, "pass", tuple(f"{MISSION}/{PASS}/{gid}/{gid}-{i}.jpg" for i in range(1, per_group + 1)))


def _traced_peak(store: ResultStore, n_images: int) -> int:
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/data", sharding_mode="per_image")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run_id = store.create_run(spec, _generated(n_images), farm=True)
        sent = sum(len(payload_keys(p))
                   for p in payloads_for(store.iter_unfinished_items(run_id, page=2000), "per_image", "s"))
        assert sent == n_images
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_registering_and_streaming_a_run_holds_nothing_per_image(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_REGISTER_CHUNK", 2000)
    store = ResultStore(pg_url)
    _traced_peak(store, 2000)  # one-off allocations (statement caches, the driver's buffers)
    small = _traced_peak(store, 20_000)
    large = _traced_peak(store, 80_000)
    # A list of the run's items or rows would make the 4x run's peak about 4x (1 MiB+ per 10k images).
    assert large < small * 1.5, (small, large)


def test_sampling_a_capped_label_holds_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def peak(n: int) -> int:
        groups = (Group(f"QC-{i:07d}", "pass", (f"m/{PASS}/QC-{i:07d}/a.jpg",) * 4) for i in range(n))
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            kept = sum(1 for _ in SampledStream(groups, n // 2, None, 42))
            assert kept == n // 2
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(1000)
    small, large = peak(20_000), peak(80_000)
    # Spooled: what grows is 9 bytes per group (a key and a mask byte), not the groups themselves.
    assert large < small * 2, (small, large)
    assert large < 80_000 * 60, large


def test_a_failing_scan_records_no_run(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_REGISTER_CHUNK", 3)
    store = ResultStore(pg_url)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/data")

    def failing() -> Iterator[GroupInput]:
        yield from _generated(50)
        raise OSError("disk went away")

    with pytest.raises(OSError):
        store.create_run(spec, failing(), farm=True)
    assert store.latest_run() is None
    _tree(tmp_path, random.Random(5))
    monkeypatch.setattr(producer.register, "_kept_check", lambda sampled: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError):
        register_run(store, RunSpec(mission=MISSION, dataset="bbu", input_root=""), tmp_path, farm=True)
    assert store.latest_run() is None


_KILLED_REGISTRATION = """
import sys, time
from pathlib import Path
import stage_a.store.store as store_module
from stage_a.config import RunSpec
from stage_a.store import GroupInput, ResultStore

store_module._REGISTER_CHUNK = 100
url, marker = sys.argv[1], Path(sys.argv[2])

def groups():
    for g in range(10**9):
        if g == 200:  # two chunks of groups and images COPYed into the open transaction
            marker.write_text("copied")
            time.sleep(600)
        yield GroupInput(f"QC-K-{g:07d}", "pass", (f"m/x/{g}/a.jpg", f"m/x/{g}/b.jpg"))

ResultStore(url).create_run(RunSpec(mission="m", dataset="bbu", input_root="/data"), groups(), farm=True)
"""


def test_an_enqueue_killed_mid_registration_leaves_no_run(tmp_path: Path, pg_url: str) -> None:
    from sqlalchemy import text

    ResultStore(pg_url).close()  # the schema, before the child starts
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_REGISTRATION, pg_url, str(marker)], env=env)
    try:
        while not marker.exists():
            assert child.poll() is None, "the registering process ended before it was killed"
            time.sleep(0.05)
        store = ResultStore(pg_url)
        with store.engine.connect() as c:  # the rows are there, uncommitted: invisible
            assert c.execute(text("SELECT count(*) FROM images")).scalar() == 0
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with store.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM runs")).scalar() == 0
        assert c.execute(text("SELECT count(*) FROM groups")).scalar() == 0
        assert c.execute(text("SELECT count(*) FROM images")).scalar() == 0
    assert store.latest_run() is None


def test_unfinished_keys_of_a_fresh_run_come_from_its_groups_and_after_work_from_its_rows(store: ResultStore) -> None:
    """`stage-a enqueue` publishes keys only: a fresh run's from its groups' sizes (no image row read), a
    touched run's from its unfinished rows; both equal the unfinished items' keys."""
    from stage_a.work import ImageResult

    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/data", sharding_mode="per_image")
    groups = [GroupInput(f"QC-K-{g:03d}", "pass", tuple(f"{MISSION}/{PASS}/g{g}/{i}.jpg" for i in range(1 + g % 4)))
              for g in range(23)]
    run_id = store.create_run(spec, groups, farm=True)
    store.create_run(spec, groups[:3], farm=True)  # another run's keys never show
    items = [it.key for it in store.iter_unfinished_items(run_id)]
    assert len(items) == sum(len(g.images) for g in groups)
    assert list(store.iter_unfinished_keys(run_id, page=4)) == items
    done, leased = items[:5], items[5:9]
    store.record_results([ImageResult(k, summary="无关图片", raw_text="x") for k in done], "w", "m", "transformers")
    store.lease(leased, "w", 60)
    assert list(store.iter_unfinished_keys(run_id, page=4)) == items[5:]  # the leased ones are unfinished too
