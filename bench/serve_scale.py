"""The operator views and export at scale: a run of N images seeded, then every view timed.

    python bench/serve_scale.py                      # fresh database on the local PostgreSQL, dropped after
    python bench/serve_scale.py --images 100000,1000000,10000000   # one fresh database per size
    python bench/serve_scale.py --images 1000000 --export --writes  # also export time + peak RSS, write costs
    python bench/serve_scale.py --db postgresql+psycopg://...   # an existing database (run left there)
    python bench/serve_scale.py --demo 24 --keep     # a small realistic run whose thumbnails exist (screenshots)

Rows are inserted with the store's own COPY path (create_run, groups generated lazily) and finished
by set-based UPDATEs of a million images each, so the counters' triggers see every write as a
worker's would (a check compares them with a full count at the end): 97% done (summaries in the SPEC's shapes, one in six 无关图片), 1% failed, 1% in flight, 1% pending,
results spread over the last hour; three worker heartbeats. The run is unfinished, so every
request builds its full RunReport. Requests go through the real app in-process (Starlette's
TestClient): the figures are server time without the network; `status --json` and `runs` are timed
as the functions their commands call (build_report + to_json, list_runs), without the interpreter's
start. `--export` runs `stage-a export` as a subprocess (its time and peak RSS); `--writes` times
create_run and record_results batches with and without the trigram search indexes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402

from sqlalchemy import create_engine, text  # noqa: E402

from stage_a.config import RunSpec  # noqa: E402
from stage_a.store import GroupInput, ResultStore, utcnow  # noqa: E402
from stage_a.store.models import WorkerRow  # noqa: E402

MISSION = "挡风板安装检查"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SUMMARIES = [
    '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}, "数量": {"1": 1}}, {"类别": "挡风板", "安装状态": {"已安装": 1}, '
    '"方向": {"正确": 1}}, {"类别": "标签", "文本": {"BBU-01": 1}, "可读性": {"可读": 1}}], "备注": ["黄色箭头1个"]}',
    '{"统计": [{"类别": "BBU设备", "品牌": {"爱立信": 1}}, {"类别": "光纤", "弯曲半径": {"合理": 2}, "保护": {"有": 2}}]}',
    "无关图片",
    '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 2}, "堆叠": {"是": 1}}, {"类别": "挡风板", "安装状态": {"未安装": 1}}], '
    '"备注": ["两台BBU上下堆叠"]}',
    '{"统计": [{"类别": "机柜处接地螺丝", "紧固": {"是": 2}}, {"类别": "电线", "整齐": {"是": 1}}, '
    '{"类别": "标签", "可读性": {"不可读": 1}}]}',
    '{"统计": [{"类别": "BBU安装螺丝", "数量": {"4": 1}, "紧固": {"是": 4}}, {"类别": "BBU设备", "品牌": {"华为": 1}}]}',
]


class BenchGroups(Sequence[GroupInput]):
    """The run's groups, made when read (a 10M-image run's list would take gigabytes)."""

    def __init__(self, n_groups: int, per_group: int, files: list[str] | None) -> None:
        self.n, self.per, self.files = n_groups, per_group, files

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g):  # type: ignore[no-untyped-def,override]
        if isinstance(g, slice):
            return [self[i] for i in range(*g.indices(self.n))]
        if not 0 <= g < self.n:
            raise IndexError(g)
        label = "fail" if g < self.n // 3 else "pass"
        folder = "审核不通过" if label == "fail" else "审核通过"
        gid = f"QC-BENCH-20250101-{g:07d}"
        if self.files:
            return GroupInput(gid, label, tuple(self.files[(g * self.per + i) % len(self.files)]
                                                for i in range(self.per)))
        return GroupInput(gid, label, tuple(f"{MISSION}/{folder}/{gid}/{gid}-{i}.jpg" for i in range(1, self.per + 1)))


def seed_run(store: ResultStore, input_root: str, n_images: int, per_group: int = 4,
             files: list[str] | None = None) -> int:
    """Insert a run of ``n_images`` and finish most of it (PostgreSQL: set-based UPDATEs)."""
    n_groups = max(1, n_images // per_group)
    groups = BenchGroups(n_groups, per_group, files)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root=input_root, checkpoint="/models/qwen3-vl-stage-a-lora-v7",
                   sharding_mode="per_image")
    run_id = store.create_run(spec, groups, farm=True)
    now = utcnow()
    cases = " ".join(f"WHEN {i} THEN :s{i}" for i in range(len(SUMMARIES)))
    params = {f"s{i}": s for i, s in enumerate(SUMMARIES)}
    k = "(group_position * 7 + image_index)"
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET model = :m WHERE id = :r"), {"m": "qwen3-vl-stage-a-lora-v7:3f9c2a1b", "r": run_id})
    step = max(1, 1_000_000 // per_group)
    for lo in range(0, n_groups, step):
        with store.engine.begin() as c:
            _finish(c, run_id, lo, lo + step, k, cases, params, now, n_groups)
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE images"))  # what autovacuum does to a table this size
        c.execute(text("VACUUM ANALYZE groups"))
    _heartbeats(store, run_id, n_images, utcnow())  # fresh: live workers (no dead holders to count)
    return run_id


def _finish(c, run_id: int, lo: int, hi: int, k: str, cases: str, params: dict[str, str], now,  # type: ignore[no-untyped-def]
            n_groups: int) -> None:
    """Finish groups [lo, hi) of the run as workers would: one UPDATE (the counters' triggers run)."""
    c.execute(text(
        f"UPDATE images SET status = CASE WHEN {k} % 100 = 97 THEN 'failed' WHEN {k} % 100 = 98 THEN 'leased' "
        f"WHEN {k} % 100 = 99 THEN 'pending' ELSE 'done' END, "
        f"summary = CASE WHEN {k} % 100 < 97 THEN (CASE {k} % {len(SUMMARIES)} {cases} END) END, "
        f"raw_text = CASE WHEN {k} % 100 < 97 THEN '<DOMAIN=bbu>, <TASK={MISSION}>' || chr(10) || "
        f"(CASE {k} % {len(SUMMARIES)} {cases} END) END, "
        f"error = CASE WHEN {k} % 100 = 97 THEN 'cannot identify image file (not an image)' END, "
        "worker = 'gpu' || (group_position % 3) || '@farm-a', model = 'qwen3-vl-stage-a-lora-v7:3f9c2a1b', "
        "engine = 'transformers', preprocess_ms = 8 + group_position % 5, generate_ms = 180 + group_position % 40, "
        "completion_tokens = 60 + image_index * 3, prompt_tokens = 900, vision_tokens = 640, attempts = 1, "
        "updated_at = :now - make_interval(secs => 3600.0 * (1 - group_position::float / :n)) "
        "WHERE run_id = :r AND group_position >= :lo AND group_position < :hi"
    ), {**params, "now": now, "n": n_groups, "r": run_id, "lo": lo, "hi": hi})
    c.execute(text("UPDATE images SET updated_at = NULL, worker = NULL, model = NULL, engine = NULL "
                   "WHERE run_id = :r AND status = 'pending' AND group_position >= :lo AND group_position < :hi"),
              {"r": run_id, "lo": lo, "hi": hi})


def _heartbeats(store: ResultStore, run_id: int, n_images: int, now) -> None:  # type: ignore[no-untyped-def]
    with store.engine.begin() as c:
        for i in range(3):
            c.execute(WorkerRow.__table__.delete().where(WorkerRow.name == f"gpu{i}@farm-a"))
            c.execute(WorkerRow.__table__.insert().values(
                name=f"gpu{i}@farm-a", model="qwen3-vl-stage-a-lora-v7:3f9c2a1b", engine="transformers",
                device=f"cuda:{i}", state="busy", started_at=now - timedelta(hours=1), heartbeat_at=now,
                run_id=run_id, last_batch_at=now - timedelta(seconds=3), last_batch_images=32,
                last_batch_seconds=4.1, images_per_s=7.8, tokens_per_s=512.0, images_total=n_images // 3))


GROUP_SECTION = '<section class="group"'
"""How the run page opens each group it shows (monitor/web/templates/run.html)."""


def timed(fn, repeat: int) -> tuple[float, float, str]:  # type: ignore[no-untyped-def]
    """Median and worst milliseconds of ``fn()`` over ``repeat`` calls, and what the last one said."""
    times = []
    said = ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        said = str(fn())
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times), said


def views(store: ResultStore, run_id: int, repeat: int) -> None:
    """Every view of the run, median server time."""
    from starlette.testclient import TestClient

    from monitor.report import build_report, list_runs
    from monitor.web.app import create_app
    from stage_a.settings import Settings

    settings = Settings.from_env()
    client = TestClient(create_app(store, settings))
    row = store.queries.run_row(run_id)
    mid = (row.n_groups if row else 0) // 2
    pages = [
        ("run page, first page", f"/runs/{run_id}"),
        ("run page, middle (keyset)", f"/runs/{run_id}?after={mid}"),
        ("run page, middle, previous page", f"/runs/{run_id}?before={mid}"),
        ("run page, failed only", f"/runs/{run_id}?failed=1"),
        ("run page, failed only, middle", f"/runs/{run_id}?failed=1&after={mid}"),
        ("run page, 无关图片 only", f"/runs/{run_id}?irrelevant=1"),
        ("run page, 无关图片 only, fail label", f"/runs/{run_id}?irrelevant=1&label=fail"),
        ("run page, label pass, middle", f"/runs/{run_id}?label=pass&after={mid}"),
        ("run page, search 爱立信 (1 in 6)", f"/runs/{run_id}?q=%E7%88%B1%E7%AB%8B%E4%BF%A1"),
        ("run page, search 爱立信, middle", f"/runs/{run_id}?q=%E7%88%B1%E7%AB%8B%E4%BF%A1&after={mid}"),
        ("run page, search 爱立信, last page", f"/runs/{run_id}?q=%E7%88%B1%E7%AB%8B%E4%BF%A1&after={2 * mid - 8}"),
        ("run page, search one group id", f"/runs/{run_id}?q=QC-BENCH-20250101-{mid:07d}"),
        ("run page, search a group id's number", f"/runs/{run_id}?q={mid:07d}"),
        ("run page, search one file name", f"/runs/{run_id}?q=QC-BENCH-20250101-{mid:07d}-2.jpg"),
        ("run page, search, no match", f"/runs/{run_id}?q=nowhere-to-be-found"),
        ("/metrics", "/metrics"),
        ("/api/runs/{id}", f"/api/runs/{run_id}"),
        ("/ (runs)", "/"),
    ]
    print(f"{'request':40s} {'median ms':>10s} {'max ms':>8s}  status, groups shown")

    def get(u: str) -> str:
        res = client.get(u)
        return f"{res.status_code}, {res.text.count(GROUP_SECTION)}"

    for label, u in pages:
        med, worst, said = timed(lambda u=u: get(u), repeat)
        print(f"{label:40s} {med:10.1f} {worst:8.0f}  {said}", flush=True)
    for label, fn in (("stage-a status RUN --json (in-process)",
                       lambda: len(build_report(store, run_id, settings, None, writers=False).to_json())),
                      ("stage-a runs (in-process)", lambda: len(list_runs(store, 50, settings)))):
        med, worst, _ = timed(fn, repeat)
        print(f"{label:40s} {med:10.1f} {worst:8.0f}", flush=True)


def export(url: str, run_id: int) -> None:
    """`stage-a export` of the run as a subprocess: wall time and its peak RSS."""
    out = Path(tempfile.mkdtemp(prefix="stage_a_bench_export_"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", "export", str(run_id), "--db", url, "--output-dir", str(out)],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"export: {wall:.1f} s, peak RSS {peak / 1024:.0f} MiB{' (or an earlier child)' if peak == before else ''}, "
          f"{size:.0f} MiB written, exit {res.returncode}", flush=True)
    if res.returncode not in (0, 1):
        print(res.stderr[-2000:])
    subprocess.run(["rm", "-rf", str(out)], check=False)


def writes(store: ResultStore, rounds: int = 20, batch: int = 128) -> None:
    """record_results of model batches (and create_run of 100k images) with and without the search indexes."""
    from stage_a.work import ImageKey, ImageResult

    def record_batches(run_id: int) -> float:
        times = []
        for b in range(rounds):
            results = [ImageResult(ImageKey(run_id, (b * batch + i) // 4, (b * batch + i) % 4 + 1),
                                   summary=SUMMARIES[i % len(SUMMARIES)], raw_text="x", preprocess_ms=8.0,
                                   generate_ms=190.0, completion_tokens=70, prompt_tokens=900)
                       for i in range(batch)]
            t0 = time.perf_counter()
            store.record_results(results, "gpu9@bench", "m", "transformers")
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    def create() -> tuple[float, int]:
        spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/nonexistent", checkpoint="/m",
                       sharding_mode="per_image")
        t0 = time.perf_counter()
        run_id = store.create_run(spec, BenchGroups(25_000, 4, None), farm=True)
        return time.perf_counter() - t0, run_id

    names = ("ix_groups_search", "ix_images_search")
    with store.engine.connect() as c:
        definitions = {n: c.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"), {"n": n}).scalar()
                       for n in names}
    if None in definitions.values():
        print(f"writes: a search index is missing (pg_trgm?): {definitions}; nothing to compare")
        return
    # Each state drops one more index: both, then without the group ids' index, then without either.
    for state, drop in (("with both search indexes", None), ("without ix_groups_search", names[0]),
                        ("without either search index", names[1])):
        if drop:
            with store.engine.begin() as c:
                c.execute(text(f"DROP INDEX {drop}"))
        secs, run_id = create()
        ms = record_batches(run_id)
        print(f"writes {state}: create_run 100k images {secs:.1f} s, "
              f"record_results {batch} images {ms:.1f} ms (median of {rounds})", flush=True)
    with store.engine.begin() as c:
        for definition in definitions.values():
            c.execute(text(definition))


def check_counters(store: ResultStore, run_id: int) -> None:
    """The counters the triggers kept against a full count."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.counts import counter_mismatches

    bad = counter_mismatches(store.engine, run_id)
    print("counters equal a full count" if not bad else f"COUNTERS DIFFER: {bad}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="400000", help="run sizes, comma-separated (one fresh database each)")
    ap.add_argument("--db", help="database URL (default: a fresh database on the local PostgreSQL)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--run", type=int, help="time an existing run of --db instead of seeding one")
    ap.add_argument("--keep", action="store_true", help="keep the fresh database (its URL is printed)")
    ap.add_argument("--export", action="store_true", help="also time `stage-a export` (and its peak RSS)")
    ap.add_argument("--writes", action="store_true", help="also time writes with and without the search index")
    ap.add_argument("--check", action="store_true", help="compare the counters with a full count (slow)")
    ap.add_argument("--demo", type=int, metavar="GROUPS",
                    help="a small run over a generated photo tree (thumbnails exist), for screenshots")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for n_images in [int(x) for x in args.images.split(",")]:
        one_size(args, n_images)
    return 0


def one_size(args: argparse.Namespace, n_images: int) -> None:
    admin = None
    url = args.db
    if url is None:
        name = f"stage_a_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    store = ResultStore(url)
    try:
        if args.demo:
            from producer.sample_data import make_sample_tree

            root = Path(tempfile.mkdtemp(prefix="stage_a_demo_"))
            make_sample_tree(root, MISSION, n_fail=args.demo // 2, n_pass=args.demo - args.demo // 2)
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
            files += sorted(str(p.relative_to(root)) for p in root.rglob("*.JPG"))
            run_id = seed_run(store, str(root), args.demo * 3, per_group=3, files=files)
            print(f"demo run {run_id} in {url} (photos under {root})")
            return
        if args.run:
            run_id = args.run
            # Fresh heartbeats, as after seeding: stale ones make every leased row a dead holder's, which
            # the views then count (the reclaimer would have released them within a minute).
            _heartbeats(store, run_id, store.get_run(run_id).n_images, utcnow())
        else:
            t0 = time.perf_counter()
            run_id = seed_run(store, "/nonexistent/photos", n_images)
            print(f"\n== seeded run {run_id}: {n_images:,} images in {time.perf_counter() - t0:.1f}s "
                  f"(load {os.getloadavg()[0]:.1f}; {url})", flush=True)
        views(store, run_id, args.repeat)
        if args.export:
            export(url, run_id)
        if args.check:
            check_counters(store, run_id)
        if args.writes:
            writes(store)
    finally:
        store.close()
        if admin is not None:
            if args.keep:
                print(f"kept {url}")
            else:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
