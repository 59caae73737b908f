"""Chaos run: a worker farm summarizes a few hundred images while workers and Redis are killed.

    python bench/chaos.py --images 300 --workers 3 --seed 1

Starts its own Redis (no persistence: a kill loses every queued message), a fresh results
database (PostgreSQL through --pg-admin when reachable, else SQLite), and --workers Celery
workers on the tiny random-weight Qwen3-VL (CPU unless STAGE_A_DEVICE says otherwise). It
enqueues the run, then every few seconds SIGKILLs a whole worker (restarted a moment later), a
worker's pool process only (Celery forks a new one), or Redis (restarted on the same port), or
pushes a poison entry onto the queue (every shape a worker must survive: not JSON, not an
envelope, a body that is not base64 or not [args, kwargs, embed], pickle and other refused
content types, an unknown task, a message without an id, a huge entry, a NUL in a path, a run
id beyond the database's integers, a per_group message listing thousands of images). The input
tree holds --symlinks images symlinked to a file outside the input root (they must fail, and
the run must still finish), and --other-model-workers workers pinned to another model (a
second tiny checkpoint) share the queue (they must never summarize the run).
When the run is finished it exports it with `stage-a export` and checks the result:

    images   images in the run
    kills    worker kills, pool-process kills, Redis restarts
    lost     images without a result + groups in neither the JSONL nor the failure report
    duplicated  group lines beyond one per group + image rows beyond one per image
    wrong_model  done rows whose model is not the run's
    poison   entries pushed, dead-lettered, lost with a Redis restart before a worker popped them
    finished `stage-a status` says the run is finished; escaping symlinks all failed and reported

and prints one summary line (exit status 1 when anything is lost, duplicated or served by
another model, a poison entry pushed after the last Redis restart was not dead-lettered, a worker
exited on its own, or the run did not finish).
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


def add_escaping_symlinks(root: Path, groups: list[tuple[str, str, int]], n: int,
                          rng: random.Random) -> list[tuple[str, str, int]]:
    """Give ``n`` groups one more image: a symlink to a file outside the input root."""
    secret = root.parent / "outside-the-root.jpg"
    secret.write_bytes(next(root.rglob("*.jpg")).read_bytes())
    chosen = set(rng.sample(range(len(groups)), min(n, len(groups))))
    out = []
    for i, (gid, label, k) in enumerate(groups):
        if i in chosen:
            folder = root / MISSION / ("审核不通过" if label == "fail" else "审核通过") / gid
            os.symlink(secret, folder / f"{gid}-{k + 1}.jpg")
            k += 1
        out.append((gid, label, k))
    return out


# ---- poison ---------------------------------------------------------------------------------


def _envelope(queue: str, body: bytes, token: str, content_type: str = "application/json",
              task: str = "stage_a.summarize", with_id: bool = True) -> bytes:
    import base64

    tid = str(uuid.uuid4())
    headers: dict[str, Any] = {"lang": "py", "task": task, "root_id": tid, "origin": token, "retries": 0}
    if with_id:
        headers["id"] = tid
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": headers,
        "properties": {"correlation_id": tid, "reply_to": "", "delivery_mode": 2, "priority": 0, "body_encoding":
                       "base64", "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": tid},
    }).encode()


POISON_SHAPES = ("not-json", "not-envelope", "bad-base64", "body-not-triple", "body-not-json", "yaml", "pickle",
                 "unknown-task", "no-id", "huge", "nul-path", "run-id-range", "group-too-many")


def poison_entry(shape: str, queue: str, run_id: int, token: str) -> bytes:
    """One queue entry of ``shape``; ``token`` appears near its start (and so in its dead letter)."""
    import pickle

    def task(payload: Any) -> bytes:
        return _envelope(queue, json.dumps([[payload], {}, {}]).encode(), token)

    good = {"v": 1, "run_id": run_id, "group_position": 0, "image_index": 1}
    if shape == "not-json":
        return f"{token} \xff not json".encode() + b"\xff\x00"
    if shape == "not-envelope":
        return json.dumps([token, 1, 2]).encode()
    if shape == "bad-base64":
        return _envelope(queue, b"x", token).replace(b'"body": "eA=="', b'"body": "!!!abc"')
    if shape == "body-not-triple":
        return _envelope(queue, json.dumps({"token": token}).encode(), token)
    if shape == "body-not-json":
        return _envelope(queue, b"not json " + token.encode(), token)
    if shape == "yaml":
        return _envelope(queue, b"a: b", token, content_type="application/x-yaml")
    if shape == "pickle":
        return _envelope(queue, pickle.dumps({"token": token}), token, content_type="application/x-python-serialize")
    if shape == "unknown-task":
        return _envelope(queue, b"[[], {}, {}]", token, task="someone.elses_task")
    if shape == "no-id":
        return _envelope(queue, b"[[], {}, {}]", token, with_id=False)
    if shape == "huge":
        return token.encode() + b"x" * 3_000_000
    if shape == "nul-path":
        return task({**good, "path": f"{token}\x00.jpg"})
    if shape == "run-id-range":
        return task({**good, "run_id": 2**40, "path": token})
    if shape == "group-too-many":
        return task({"v": 1, "note": token, "run_id": run_id, "group_position": 0,
                     "images": [{"image_index": i, "path": f"x-{i}.jpg"} for i in range(1, 3001)]})
    raise ValueError(shape)


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
    p.add_argument("--symlinks", type=int, default=4, help="images symlinked outside the input root")
    p.add_argument("--other-model-workers", type=int, default=1,
                   help="workers pinned to another model (a second tiny checkpoint) on the same queue")
    p.add_argument("--db", help="results database URL (default: a fresh PostgreSQL database, else SQLite)")
    p.add_argument("--pg-admin", default=os.environ.get("STAGE_A_TEST_PG_URL",
                                                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--workdir", type=Path, help="keep logs and outputs here (default: a temp dir, removed)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stage-a-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests/: the store helpers of tests/support
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        from engine.tiny_model import cached_tiny_checkpoint
        from stage_a.settings import Settings

        checkpoint = str(cached_tiny_checkpoint(Settings.from_env().cache_path / "models"))
    from engine.tiny_model import cached_tiny_checkpoint
    from stage_a.checkpoint import Checkpoint
    from stage_a.settings import Settings

    other_checkpoint = str(cached_tiny_checkpoint(Settings.from_env().cache_path / "models", seed=7))
    run_model = Checkpoint.open(checkpoint).identity
    groups = add_escaping_symlinks(workdir / "in", make_tree(workdir / "in", args.images, rng), args.symlinks, rng)
    n_images = sum(n for _, _, n in groups)
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
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        workers = [Worker(f"c{i}", env, workdir) for i in range(args.workers)]
        workers += [Worker(f"other{i}", {**env, "STAGE_A_CHECKPOINT": other_checkpoint}, workdir)
                    for i in range(args.other_model_workers)]
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
        log(f"run {run_id}: {n_images} images ({args.symlinks} escaping symlinks) in {len(groups)} groups; "
            f"{args.workers} workers + {args.other_model_workers} of another model; db {db_url.split('://')[0]}")
        import redis as redis_py

        poison: list[tuple[str, str, float]] = []  # (token, shape, pushed at)
        redis_kills: list[float] = []

        from stage_a.store import ResultStore

        store = ResultStore(db_url)
        next_chaos = time.monotonic() + rng.uniform(*args.interval)
        redis_back_at: float | None = None
        last_report = 0.0
        while True:
            now = time.monotonic()
            counts = store.queries.counts(run_id)
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
                if w.proc is not None and w.proc.poll() is not None and w.proc.returncode not in (-9, 2):
                    kills["self_exits"] += 1  # exited on its own (not our SIGKILL, not Redis down at start)
                    log(f"worker {w.name} exited with {w.proc.returncode}")
                    w.proc = None
                if not w.alive():
                    if w.restart_at is None:
                        w.restart_at = now + rng.uniform(1, 4)
                    elif now >= w.restart_at and redis_back_at is None:
                        w.start()
            if now - t0 < args.chaos_seconds and now >= next_chaos:
                next_chaos = now + rng.uniform(*args.interval)
                action = rng.choices(["worker", "pool", "redis", "poison"], weights=[5, 2, 2, 6])[0]
                live = [w for w in workers if w.alive()]
                if action == "poison" and redis_back_at is None:
                    for _ in range(rng.randint(1, 3)):
                        shape = rng.choice(POISON_SHAPES)
                        token = f"chaos-poison-{len(poison):04d}"
                        try:
                            redis_py.Redis(port=redis.port).lpush("stage_a_chaos", poison_entry(shape, "stage_a_chaos",
                                                                                                 run_id, token))
                            poison.append((token, shape, time.monotonic()))
                        except Exception as exc:
                            log(f"could not push poison: {exc}")
                elif action == "redis" and redis_back_at is None:
                    redis.kill()
                    redis_kills.append(time.monotonic())
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
        # A last burst of every poison shape once the chaos is over: each must be dead-lettered.
        for shape in POISON_SHAPES:
            token = f"chaos-poison-{len(poison):04d}"
            redis_py.Redis(port=redis.port).lpush("stage_a_chaos", poison_entry(shape, "stage_a_chaos", run_id, token))
            poison.append((token, shape, time.monotonic()))
        last_kill = max(redis_kills, default=0.0)
        must = [(t, sh) for t, sh, at in poison if at > last_kill]
        deadline = time.monotonic() + 120
        while True:
            from support.store import dead_letters

            letters = "\n".join(p for _, p in dead_letters(store))
            missing_poison = [(t, sh) for t, sh in must if t not in letters]
            if not missing_poison or time.monotonic() > deadline:
                break
            time.sleep(1)
        found = sum(1 for t, _, _ in poison if t in letters)
        status = subprocess.run([sys.executable, "-m", "cli.main", "status", str(run_id)], capture_output=True,
                                text=True, env=env, cwd=workdir, timeout=120)
        finished = "state: finished" in status.stdout

        out = workdir / "out"
        exp = subprocess.run([sys.executable, "-m", "cli.main", "export", str(run_id), "--output-dir", str(out)],
                             capture_output=True, text=True, env=env, cwd=workdir, timeout=300)
        if exp.returncode not in (0, 3):
            log(f"export failed: {exp.stderr.strip()}")
            return 2
        records = [json.loads(ln) for ln in (out / f"{MISSION}_stage_a.jsonl").read_text("utf-8").splitlines()]
        failures = [json.loads(ln) for ln in
                    (out / f"{MISSION}_stage_a_failures.jsonl").read_text("utf-8").splitlines() if ln.strip()]
        from support.store import image_rows

        rows = image_rows(store, run_id)
        store.close()

        expected = {(g, label): n for g, label, n in groups}
        exported = Counter((r["group_id"], r["label"]) for r in records)
        reported = {(f["group_id"], f["label"]) for f in failures}
        missing_groups = [k for k in expected if k not in exported and k not in reported]
        unfinished = [r for r in rows if r["status"] not in ("done", "failed")]
        lost = len(unfinished) + sum(expected[k] for k in missing_groups)
        row_keys = Counter((r["group_position"], r["image_index"]) for r in rows)
        duplicated = sum(c - 1 for c in exported.values()) + (len(rows) - len(row_keys)) + \
            max(0, len(rows) - n_images)
        wrong_model = sum(1 for r in rows if r["status"] == "done" and r["model"] != run_model)
        escaping = [r for r in rows if os.path.islink(workdir / "in" / r["rel_path"])]
        escaping_ok = len(escaping) == args.symlinks and all(
            r["status"] == "failed" and "leaves the input root" in (r["error"] or "") for r in escaping)
        order_ok = [k for k in exported] == [k for k in expected if k in exported]
        failed = [r for r in rows if r["status"] == "failed" and r not in escaping]
        redelivered = sum(1 for r in rows if r["attempts"] > 1)
        for r in failed[:10]:
            log(f"failed image {r['rel_path']}: {r['error']}")
        for t, sh in missing_poison:
            log(f"poison entry {t} ({sh}) pushed after the last Redis restart was not dead-lettered")
        print(f"chaos: images={n_images} groups={len(groups)} exported_groups={len(exported)} "
              f"failed_groups={len(reported)} escaping_symlinks={len(escaping)} escaping_failed_ok={escaping_ok} "
              f"other_failed_images={len(failed)} kills: workers={kills['worker']} pool_processes={kills['pool']} "
              f"redis={kills['redis']} poison: pushed={len(poison)} dead_lettered={found} "
              f"lost_with_redis={len(poison) - found - len(missing_poison)} missing={len(missing_poison)} "
              f"worker_self_exits={kills['self_exits']} lost={lost} duplicated={duplicated} "
              f"wrong_model={wrong_model} finished={finished} order_ok={order_ok} "
              f"redelivered_images={redelivered} elapsed={elapsed:.0f}s", flush=True)
        ok = lost == 0 and duplicated == 0 and wrong_model == 0 and order_ok and finished and escaping_ok
        return 0 if ok and not missing_poison and not kills["self_exits"] else 1
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
