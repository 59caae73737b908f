"""`stage-a serve` at scale: a run of 400,000 images inserted directly, then the pages timed.

    python bench/serve_scale.py                      # fresh database on the local PostgreSQL, dropped after
    python bench/serve_scale.py --images 1000000
    python bench/serve_scale.py --db postgresql+psycopg://...   # an existing database (run left there)
    python bench/serve_scale.py --demo 24 --keep     # a small realistic run whose thumbnails exist (screenshots)

Rows are inserted with the store's own COPY path (create_run) and finished by set-based UPDATEs:
97% done (summaries in the SPEC's shapes, one in six 无关图片), 1% failed, 1% in flight, 1% pending,
results spread over the last hour; three worker heartbeats. The run is unfinished, so every
request builds its full RunReport. Requests go through the real app in-process (Starlette's
TestClient): the figures are server time without the network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def seed_run(store: ResultStore, input_root: str, n_images: int, per_group: int = 4,
             files: list[str] | None = None) -> int:
    """Insert a run of ``n_images`` and finish most of it (PostgreSQL: set-based UPDATEs)."""
    n_groups = max(1, n_images // per_group)
    groups = []
    for g in range(n_groups):
        label = "fail" if g < n_groups // 3 else "pass"
        folder = "审核不通过" if label == "fail" else "审核通过"
        gid = f"QC-BENCH-20250101-{g:07d}"
        if files:
            groups.append(GroupInput(gid, label, tuple(files[(g * per_group + i) % len(files)]
                                                       for i in range(per_group))))
        else:
            groups.append(GroupInput(gid, label, tuple(f"{MISSION}/{folder}/{gid}/{gid}-{i}.jpg"
                                                       for i in range(1, per_group + 1))))
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root=input_root, checkpoint="/models/qwen3-vl-stage-a-lora-v7",
                   sharding_mode="per_image")
    run_id = store.create_run(spec, groups, farm=True)
    now = utcnow()
    cases = " ".join(f"WHEN {i} THEN :s{i}" for i in range(len(SUMMARIES)))
    params = {f"s{i}": s for i, s in enumerate(SUMMARIES)}
    k = "(group_position * 7 + image_index)"
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET model = :m WHERE id = :r"), {"m": "qwen3-vl-stage-a-lora-v7:3f9c2a1b", "r": run_id})
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
            "WHERE run_id = :r"
        ), {**params, "now": now, "n": n_groups, "r": run_id})
        c.execute(text("UPDATE images SET updated_at = NULL, worker = NULL, model = NULL, engine = NULL "
                       "WHERE run_id = :r AND status = 'pending'"), {"r": run_id})
        c.execute(text("ANALYZE images"))
        c.execute(text("ANALYZE groups"))
    with store.engine.begin() as c:
        for i in range(3):
            c.execute(WorkerRow.__table__.delete().where(WorkerRow.name == f"gpu{i}@farm-a"))
            c.execute(WorkerRow.__table__.insert().values(
                name=f"gpu{i}@farm-a", model="qwen3-vl-stage-a-lora-v7:3f9c2a1b", engine="transformers",
                device=f"cuda:{i}", state="busy", started_at=now - timedelta(hours=1), heartbeat_at=now,
                run_id=run_id, last_batch_at=now - timedelta(seconds=3), last_batch_images=32,
                last_batch_seconds=4.1, images_per_s=7.8, tokens_per_s=512.0, images_total=n_images // 3))
    return run_id


def timed(client, url: str, repeat: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    times = []
    status = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = client.get(url)
        times.append((time.perf_counter() - t0) * 1000)
        status = res.status_code
    return statistics.median(times), max(times), status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400_000)
    ap.add_argument("--db", help="database URL (default: a fresh database on the local PostgreSQL)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--run", type=int, help="time an existing run of --db instead of seeding one")
    ap.add_argument("--keep", action="store_true", help="keep the fresh database (its URL is printed)")
    ap.add_argument("--demo", type=int, metavar="GROUPS",
                    help="a small run over a generated photo tree (thumbnails exist), for screenshots")
    args = ap.parse_args()

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
            return 0
        if args.run:
            run_id = args.run
        else:
            t0 = time.perf_counter()
            run_id = seed_run(store, "/nonexistent/photos", args.images)
            print(f"seeded run {run_id}: {args.images:,} images in {time.perf_counter() - t0:.1f}s ({url})")

        from starlette.testclient import TestClient

        from monitor.web.app import create_app
        from stage_a.settings import Settings

        client = TestClient(create_app(store, Settings.from_env()))
        mid = (store.queries.run_row(run_id).n_groups if store.queries.run_row(run_id) else 0) // 2  # type: ignore[union-attr]
        urls = [
            ("run page, first page", f"/runs/{run_id}"),
            ("run page, middle (keyset)", f"/runs/{run_id}?after={mid}"),
            ("run page, failed only", f"/runs/{run_id}?failed=1"),
            ("run page, 无关图片 only, fail label", f"/runs/{run_id}?irrelevant=1&label=fail"),
            ("run page, text search", f"/runs/{run_id}?q=%E7%88%B1%E7%AB%8B%E4%BF%A1"),
            ("/metrics", "/metrics"),
            ("/api/runs/{id}", f"/api/runs/{run_id}"),
            ("/ (runs)", "/"),
        ]
        print(f"{'request':40s} {'median ms':>10s} {'max ms':>8s}  status")
        for label, u in urls:
            med, worst, status = timed(client, u, args.repeat)
            print(f"{label:40s} {med:10.0f} {worst:8.0f}  {status}")
    finally:
        store.close()
        if admin is not None:
            if args.keep:
                print(f"kept {url}")
            else:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
            admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
