"""Chaos run: a worker farm summarizes a few hundred images while workers and Redis are killed.

    python bench/chaos.py --images 300 --workers 3 --seed 1

Starts its own Redis (no persistence: a kill loses every queued message), a fresh results
database (PostgreSQL through --pg-admin when reachable, else SQLite), and --workers Celery
workers on the tiny random-weight Qwen3-VL (CPU unless STAGE_A_DEVICE says otherwise). It
enqueues the run, then every few seconds SIGKILLs a whole worker (restarted a moment later), a
worker's pool process only (Celery forks a new one), or Redis (restarted on the same port).
When the run is finished it exports it with `stage-a export` and checks the result:

    images   images in the run
    kills    worker kills, pool-process kills, Redis restarts
    lost     images without a result + groups in neither the JSONL nor the failure report
    duplicated  group lines beyond one per group + image rows beyond one per image

and prints one summary line (exit status 1 when anything is lost or duplicated).
Every process it starts is killed on exit, and a PostgreSQL database it created is dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MISSION = "挡风板安装检查"


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGKILL) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass


# ---- inputs ---------------------------------------------------------------------------------


def make_tree(root: Path, n_images: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """Groups of 1-4 small JPEGs, about half fail / half pass; returns (group_id, label, n) in output order."""
    import numpy as np
    from PIL import Image

    groups: list[tuple[str, str, int]] = []
    made = g = 0
    while made < n_images:
        n = min(rng.randint(1, 4), n_images - made)
        label = "fail" if g % 2 else "pass"
        gid = f"QC-CHAOS-20240101-{g:07d}"
        folder = root / MISSION / ("审核不通过" if label == "fail" else "审核通过") / gid
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            w, h = rng.choice([(64, 48), (48, 64), (96, 64), (128, 96)])
            arr = np.random.default_rng(g * 10 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            (folder / f"{gid}-{i}.jpg").write_bytes(buf.getvalue())
        groups.append((gid, label, n))
        made += n
        g += 1
    order = [x for x in groups if x[1] == "fail"] + [x for x in groups if x[1] == "pass"]
    return [x for label in ("fail", "pass") for x in sorted(y for y in order if y[1] == label)]


# ---- services -------------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as f:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        kill_group(self.proc)
        self.proc = None


class Worker:
    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = workdir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_at: float | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel", "INFO", "--concurrency",
                 "1", "-n", f"{self.name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pool_pids(self) -> list[int]:
        import psutil

        if not self.alive():
            return []
        assert self.proc is not None
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        kill_group(self.proc)
        self.proc = None


def make_database(args: argparse.Namespace, workdir: Path) -> tuple[str, Any]:
    """A fresh database URL and a cleanup function."""
    if args.db:
        return args.db, lambda: None
    try:
        from sqlalchemy import create_engine, text

        admin = create_engine(args.pg_admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"stage_a_chaos_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

        return args.pg_admin.rsplit("/", 1)[0] + f"/{name}", drop
    except Exception as exc:  # no PostgreSQL here: SQLite still exercises everything but the server
        log(f"PostgreSQL not reachable ({str(exc).splitlines()[0]}); using SQLite")
        return f"sqlite:///{workdir / 'results.db'}", lambda: None


# ---- the run --------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chaos-seconds", type=float, default=240, help="stop killing after this long")
    p.add_argument("--interval", type=float, nargs=2, default=(3.0, 8.0), help="seconds between kills (min max)")
    p.add_argument("--timeout", type=float, default=1500, help="give up waiting for the run after this long")
    p.add_argument("--lease-seconds", type=float, default=20)
    p.add_argument("--checkpoint", help="model folder (default: the cached tiny random-weight model)")
    p.add_argument("--db", help="results database URL (default: a fresh PostgreSQL database, else SQLite)")
    p.add_argument("--pg-admin", default=os.environ.get("STAGE_A_TEST_PG_URL",
                                                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--workdir", type=Path, help="keep logs and outputs here (default: a temp dir, removed)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stage-a-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        from stage_a.settings import default_cache_dir
        from workers.tiny_model import cached_tiny_checkpoint

        checkpoint = str(cached_tiny_checkpoint(default_cache_dir() / "models"))
    groups = make_tree(workdir / "in", args.images, rng)
    db_url, drop_db = make_database(args, workdir)
    redis = Redis(workdir)
    workers: list[Worker] = []
    kills = Counter()
    t0 = time.monotonic()
    try:
        redis.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_")}
        env.update(
            STAGE_A_BROKER_URL=redis.url, STAGE_A_DATABASE_URL=db_url, STAGE_A_CHECKPOINT=checkpoint,
            STAGE_A_DEVICE=os.environ.get("STAGE_A_DEVICE", "cpu"), STAGE_A_QUEUE="stage_a_chaos",
            STAGE_A_FLUSH_SIZE=str(args.batch_size), STAGE_A_FLUSH_INTERVAL="0.5",
            STAGE_A_LEASE_SECONDS=str(args.lease_seconds), STAGE_A_RECLAIM_INTERVAL="2", STAGE_A_ORPHAN_GRACE="8",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
        )
        workers = [Worker(f"c{i}", env, workdir) for i in range(args.workers)]
        for w in workers:
            w.start()
        enq = subprocess.run(
            [sys.executable, "-m", "cli.main", "enqueue", "--mission", MISSION, "--input-dir", str(workdir / "in"),
             "--checkpoint", checkpoint, "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
             str(args.batch_size), "--sharding-mode", "per_image"],
            capture_output=True, text=True, env=env, cwd=workdir, timeout=300)
        if enq.returncode != 0:
            log(f"enqueue failed: {enq.stderr.strip()}")
            return 2
        run_id = int(enq.stdout.rsplit("run_id=", 1)[1].split()[0])
        log(f"run {run_id}: {args.images} images in {len(groups)} groups; {args.workers} workers; db {db_url.split('://')[0]}")

        from stage_a.store import ResultStore

        store = ResultStore(db_url)
        next_chaos = time.monotonic() + rng.uniform(*args.interval)
        redis_back_at: float | None = None
        last_report = 0.0
        while True:
            now = time.monotonic()
            counts = store.counts(run_id)
            if counts.finished:
                break
            if now - t0 > args.timeout:
                log(f"timed out: {counts}")
                return 1
            if now - last_report > 15:
                last_report = now
                log(f"done {counts.done} failed {counts.failed} pending {counts.pending} leased {counts.leased}; "
                    f"kills {dict(kills)}")
            if redis_back_at is not None and now >= redis_back_at:
                redis.start()
                redis_back_at = None
                log("redis restarted")
            for w in workers:  # restart what died (killed by us, or failed fast while Redis was down)
                if not w.alive():
                    if w.restart_at is None:
                        w.restart_at = now + rng.uniform(1, 4)
                    elif now >= w.restart_at and redis_back_at is None:
                        w.start()
            if now - t0 < args.chaos_seconds and now >= next_chaos:
                next_chaos = now + rng.uniform(*args.interval)
                action = rng.choices(["worker", "pool", "redis"], weights=[5, 2, 2])[0]
                live = [w for w in workers if w.alive()]
                if action == "redis" and redis_back_at is None:
                    redis.kill()
                    redis_back_at = now + rng.uniform(1, 4)
                    kills["redis"] += 1
                    log("killed redis")
                elif action == "pool" and live:
                    w = rng.choice(live)
                    pids = w.pool_pids()
                    if pids:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills["pool"] += 1
                        log(f"killed the pool process of {w.name}")
                elif live:
                    w = rng.choice(live)
                    w.kill()
                    w.restart_at = now + rng.uniform(1, 4)
                    kills["worker"] += 1
                    log(f"killed worker {w.name}")
            time.sleep(0.25)
        elapsed = time.monotonic() - t0

        out = workdir / "out"
        exp = subprocess.run([sys.executable, "-m", "cli.main", "export", str(run_id), "--output-dir", str(out)],
                             capture_output=True, text=True, env=env, cwd=workdir, timeout=300)
        if exp.returncode not in (0, 3):
            log(f"export failed: {exp.stderr.strip()}")
            return 2
        records = [json.loads(ln) for ln in (out / f"{MISSION}_stage_a.jsonl").read_text("utf-8").splitlines()]
        failures = [json.loads(ln) for ln in
                    (out / f"{MISSION}_stage_a_failures.jsonl").read_text("utf-8").splitlines() if ln.strip()]
        rows = store.image_rows(run_id)
        store.close()

        expected = {(g, label): n for g, label, n in groups}
        exported = Counter((r["group_id"], r["label"]) for r in records)
        reported = {(f["group_id"], f["label"]) for f in failures}
        missing_groups = [k for k in expected if k not in exported and k not in reported]
        unfinished = [r for r in rows if r["status"] not in ("done", "failed")]
        lost = len(unfinished) + sum(expected[k] for k in missing_groups)
        row_keys = Counter((r["group_position"], r["image_index"]) for r in rows)
        duplicated = sum(c - 1 for c in exported.values()) + (len(rows) - len(row_keys)) + \
            max(0, len(rows) - args.images)
        order_ok = [k for k in exported] == [k for k in expected if k in exported]
        failed = [r for r in rows if r["status"] == "failed"]
        redelivered = sum(1 for r in rows if r["attempts"] > 1)
        for r in failed[:10]:
            log(f"failed image {r['rel_path']}: {r['error']}")
        print(f"chaos: images={args.images} groups={len(groups)} exported_groups={len(exported)} "
              f"failed_groups={len(reported)} failed_images={len(failed)} kills: workers={kills['worker']} "
              f"pool_processes={kills['pool']} redis={kills['redis']} lost={lost} duplicated={duplicated} "
              f"order_ok={order_ok} redelivered_images={redelivered} elapsed={elapsed:.0f}s", flush=True)
        return 0 if lost == 0 and duplicated == 0 and order_ok else 1
    finally:
        for w in workers:
            w.kill()
        redis.kill()
        try:
            drop_db()
        except Exception as exc:
            log(f"could not drop the chaos database: {exc}")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs and outputs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
