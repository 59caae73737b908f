"""One farm worker (Celery over Redis, results in PostgreSQL) against the engine alone, same images and batch size.

    python bench/farm_overhead.py                                   # tiny model on the CPU
    python bench/farm_overhead.py --images 128 --batch-size 8 --flush-batches 1,4,8 --rounds 3
    python bench/farm_overhead.py --checkpoint /models/qwen3-vl-2b --device cuda --images 1024 --batch-size 32

Engine alone: StepLoop.run in this process (prefetching loader, per_image batches
ordered by vision tokens over windows of 64 batches, results committed to the same PostgreSQL).
Farm: `celery -A workers worker --concurrency 1` as a separate process, started the way an
operator starts it. The worker is warmed first (a warm-up run loads the model), then each measured
run is enqueued with the fast publisher and the clock runs from the first publish to the last
committed result: queueing, celery-batches buffering, leases and per-batch commits are inside the
figure, model loading is outside both. Engine and farm runs alternate (--rounds pairs per flush
size) because the shared 2-core machine's load changes by the minute; the median ratio is the
verdict. Target (issue 6): farm >= 95% of the engine's images/s.

--flush-batches sets the worker's STAGE_A_FLUSH_SIZE (messages per celery-batches flush) to k x
--batch-size; the model batch stays --batch-size (the run's batch_size). A worker can only order
by length, and overlap decoding with generation, inside one flush: with k = 1 neither happens.
Besides images/s it prints CPU seconds per image (the bench process for the engine; the Celery
main + pool processes for the farm), which the machine's load disturbs much less, and the padding
fraction of the batches each actually ran (regrouped from the stored per-row generate_ms).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, REDIS_URL, ROOT, machine_line, pg_database, tiny_checkpoint, write_tree  # noqa: E402
from support.store import image_rows  # noqa: E402

SIZES = [(1600, 1200), (320, 240), (1200, 1600), (640, 480), (1920, 1080), (480, 640), (1024, 768),
         (400, 300), (2048, 1536), (800, 800), (1280, 720), (720, 1280)]


def make_input(n_images: int, root: Path) -> Path:
    groups = []
    for g in range((n_images + 3) // 4):
        n = min(4, n_images - 4 * g)
        groups.append((f"QC-FARM-{g:05d}", "pass" if g % 2 else "fail", [SIZES[(4 * g + i) % len(SIZES)] for i in range(n)]))
    return write_tree(root, groups)


def register(store: Any, spec: Any, input_dir: Path, farm: bool) -> Any:
    from producer.register import register_run

    reg = register_run(store, spec, input_dir, farm=farm)
    return store.get_run(reg.run_id)


def wait_done(store: Any, run_id: int, n: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Poll the store until every image of the run is done or failed; returns the time it happened.

    One cheap indexed count every 0.1 s (store.counts every 50 ms would itself load the 2 CPUs).
    """
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    query = text("SELECT count(*) FROM images WHERE run_id = :r AND status IN ('done', 'failed')")
    while True:
        with store.engine.connect() as conn:
            finished = conn.execute(query, {"r": run_id}).scalar_one()
        if finished >= n:
            return time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"worker exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {finished}/{n}\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its children (the Celery main process and its pool child)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1] = ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_split(store: Any, run_id: int) -> str:
    """Where the time went, from what the engine recorded per image (batch times / rows)."""
    from support.batches import padding_fraction

    rows = image_rows(store, run_id)
    prep = sum(r["preprocess_ms"] or 0 for r in rows) / 1000
    gen = sum(r["generate_ms"] or 0 for r in rows) / 1000
    # Rows of one model batch share its generate_ms (batch time / rows): regroup them into batches.
    batches: dict[float, list[int]] = {}
    for r in rows:
        batches.setdefault(r["generate_ms"], []).append(r["prompt_tokens"] or 0)
    pad = padding_fraction(batches.values())
    return (f"prepare {prep:.1f} s + generate {gen:.1f} s summed over {len(batches)} batches, "
            f"padding {pad:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.environ.get("STAGE_A_CHECKPOINT"),
                    help="model folder (default: the tiny random-weight Qwen3-VL)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--flush-interval", type=float, default=0.2, help="STAGE_A_FLUSH_INTERVAL of the worker")
    ap.add_argument("--flush-batches", default="1,4",
                    help="worker flush sizes to try, in model batches (STAGE_A_FLUSH_SIZE = k x --batch-size)")
    ap.add_argument("--rounds", type=int, default=3, help="engine/farm measurement pairs per flush size")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    from engine.loader import load_model
    from engine.steploop import StepLoop
    from engine.transformers_engine import TransformersEngine
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.store import ResultStore

    checkpoint = args.checkpoint or str(tiny_checkpoint())
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-farm-"))
    input_dir = make_input(args.images, tmp / "input")
    warm_dir = make_input(args.batch_size, tmp / "warm")
    gen = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root="", checkpoint=checkpoint, sharding_mode="per_image",
                   batch_size=args.batch_size, generation=gen)
    print(machine_line())
    print(f"model: {checkpoint} on {args.device}; {args.images} images, per_image batches of {args.batch_size}, "
          f"{args.max_new_tokens} new tokens per image; PostgreSQL results, Redis {REDIS_URL}")

    flushes = [int(k) for k in args.flush_batches.split(",")]
    summary = []
    with pg_database("stage_a_bench_farm") as db_url:
        store = ResultStore(db_url)
        engine = TransformersEngine(load_model(Checkpoint.open(checkpoint), args.device))
        loop = StepLoop(engine, store, "bench-engine")
        warm = register(store, spec, warm_dir, farm=False)
        loop.run(warm, store.unfinished_items(warm.id))  # warm-up, as the worker gets one

        def engine_once() -> tuple[float, float]:
            run = register(store, spec, input_dir, farm=False)
            items = store.unfinished_items(run.id)
            c0, t0 = self_cpu_seconds(), time.perf_counter()
            n = loop.run(run, items)
            dt, cpu = time.perf_counter() - t0, self_cpu_seconds() - c0
            print(f"  engine alone (StepLoop.run): {n} images in {dt:.1f} s = {n / dt:.2f} images/s, "
                  f"{cpu / n:.3f} CPU s/image; {time_split(store, run.id)}", flush=True)
            return n / dt, cpu / n

        try:
            for k in flushes:
                print(f"\nworker flushing {k} x {args.batch_size} messages (STAGE_A_FLUSH_SIZE={k * args.batch_size}; "
                      f"model batches stay {args.batch_size}):", flush=True)
                with Worker(store, spec, warm_dir, checkpoint, db_url, k, args, tmp) as worker:
                    ratios, cpu_ratios = [], []
                    for _ in range(args.rounds):
                        # Engine and farm back to back, so both see about the same (shared) machine.
                        e, e_cpu = engine_once()
                        f, f_cpu = worker.measure(input_dir)
                        ratios.append(f / e)
                        cpu_ratios.append(e_cpu / f_cpu)
                        print(f"  farm / engine alone = {f / e:.1%} in images/s; {e_cpu / f_cpu:.1%} in images per "
                              f"CPU second", flush=True)
                summary.append((k, sorted(ratios), sorted(cpu_ratios)))
        finally:
            store.close()
    print(f"\n{machine_line()}")
    for k, ratios, cpu_ratios in summary:
        med = statistics.median(ratios)
        print(f"worker flush = {k} x batch size ({k * args.batch_size} messages): farm / engine alone, median of "
              f"{len(ratios)} rounds = {med:.1%} images/s (range {ratios[0]:.1%}..{ratios[-1]:.1%}), "
              f"{statistics.median(cpu_ratios):.1%} images per CPU second -> target >= 95%: "
              f"{'MET' if med >= 0.95 else 'NOT MET'}")


class Worker:
    """`celery -A workers worker --concurrency 1` flushing k model batches at a time, warmed up."""

    def __init__(self, store: Any, spec: Any, warm_dir: Path, checkpoint: str, db_url: str, k: int, args: Any,
                 tmp: Path) -> None:
        from producer.publish import Publisher
        from stage_a.settings import Settings

        self.store, self.spec, self.args, self.k = store, spec, args, k
        self.queue = f"stage_a_bench_{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=self.queue, STAGE_A_DATABASE_URL=db_url,
                   STAGE_A_CHECKPOINT=checkpoint, STAGE_A_DEVICE=args.device, STAGE_A_GPUS="",
                   # messages buffered per flush; the model batch stays the run's batch_size
                   STAGE_A_FLUSH_SIZE=str(k * args.batch_size), STAGE_A_FLUSH_INTERVAL=str(args.flush_interval),
                   STAGE_A_RECLAIM_INTERVAL="3600", STAGE_A_ORPHAN_GRACE="3600", STAGE_A_LEASE_SECONDS="3600")
        if args.device.startswith("cuda"):
            env["STAGE_A_GPUS"] = "0"
        self.log = tmp / f"worker-{self.queue}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", f"bench-{self.queue}@%h",
                 "--concurrency", "1", "--pool", "prefork", "--loglevel", "WARNING"],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.publisher = Publisher(replace(Settings.from_env(), broker_url=REDIS_URL, queue=self.queue))
        self.warm_dir = warm_dir

    def __enter__(self) -> Worker:
        w0 = time.perf_counter()
        warm = register(self.store, self.spec, self.warm_dir, farm=True)
        self.publisher.publish_items(self.store.unfinished_items(warm.id), "per_image", self.store.store_id, warm.route)
        wait_done(self.store, warm.id, warm.n_images, self.args.timeout, self.proc, self.log)
        print(f"  (worker start + model load + warm-up batch: {time.perf_counter() - w0:.1f} s, not counted)",
              flush=True)
        return self

    def measure(self, input_dir: Path) -> tuple[float, float]:
        """Enqueue a fresh run of ``input_dir``; images/s from the first publish to the last commit."""
        run = register(self.store, self.spec, input_dir, farm=True)
        items = self.store.unfinished_items(run.id)
        c0, t0 = tree_cpu_seconds(self.proc.pid), time.perf_counter()
        self.publisher.publish_items(items, "per_image", self.store.store_id, run.route, self.spec.batch_size)
        t1 = wait_done(self.store, run.id, len(items), self.args.timeout, self.proc, self.log)
        cpu = (tree_cpu_seconds(self.proc.pid) - c0) / len(items)
        c = self.store.queries.counts(run.id)
        span = (c.last_update - c.first_update).total_seconds() if c.first_update and c.last_update else 0
        print(f"  farm, 1 worker (celery + Redis + PostgreSQL): {len(items)} images in {t1 - t0:.1f} s = "
              f"{len(items) / (t1 - t0):.2f} images/s, {cpu:.3f} CPU s/image (done {c.done}, failed {c.failed}; "
              f"first to last commit {span:.1f} s); {time_split(self.store, run.id)}", flush=True)
        return len(items) / (t1 - t0), cpu

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        import redis

        q = self.queue
        redis.Redis.from_url(REDIS_URL).delete(q, f"_kombu.binding.{q}", f"_kombu.binding_permanent.{q}")


if __name__ == "__main__":
    main()
