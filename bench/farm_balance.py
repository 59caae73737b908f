"""A farm worker with two pool processes at DEFAULT settings against the engine alone, and Redis bytes
per queued image.

    python bench/farm_balance.py                       # tiny model on the CPU, 153 images, 5 rounds
    python bench/farm_balance.py --images 1024 --rounds 5 --checkpoint /models/qwen3-vl-2b --device cuda
    python bench/farm_balance.py --bytes-only --bytes-images 100000

Engine alone: StepLoop.run in this process (what `stage-a run` drives), per_image batches of the
run's --batch-size. Farm: `celery -A workers worker --concurrency 2` with no STAGE_A_FLUSH_* set
(the defaults an operator gets), warmed up, each run published with the producer's chunk messages;
the clock runs from the first publish to the last committed result. Engine and farm rounds alternate
(the shared machine's load changes by the minute); the median ratio is the verdict (issue 20: farm
>= 0.9 of the engine alone). Also printed: how many images each pool process did (the store's
`worker` column, node:pid), and Redis's MEMORY USAGE of a queue holding a whole run's messages.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, REDIS_URL, ROOT, machine_line, pg_database, tiny_checkpoint  # noqa: E402
from farm_overhead import make_input, register, wait_done  # noqa: E402
from support.store import image_rows  # noqa: E402


def redis_bytes_per_image(n: int) -> None:
    """MEMORY USAGE of a queue holding one run's n images, per image, for both sharding modes."""
    import redis

    from producer.publish import Publisher
    from stage_a.settings import Settings
    from stage_a.work import ImageKey, WorkItem

    queue = f"stage_a_bench_bytes_{uuid.uuid4().hex[:8]}"
    pub = Publisher(replace(Settings(), broker_url=REDIS_URL, queue=queue))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for mode in ("per_image", "per_group"):
            items = (WorkItem(ImageKey(123456, i // 3, i % 3 + 1), f"{MISSION}/审核通过/QC-{i // 3:07d}/{i % 3}.jpg")
                     for i in range(n))
            t0 = time.perf_counter()
            pub.publish_items(items, mode, "0123456789abcdef")
            dt = time.perf_counter() - t0
            messages, used = client.llen(queue), client.memory_usage(queue, samples=0) or 0
            print(f"Redis, {n:,} images {mode}: {messages:,} messages, {used / n:.1f} bytes per queued image "
                  f"(MEMORY USAGE {used / 2**20:.1f} MiB), published in {dt:.1f} s", flush=True)
            client.delete(queue)
    finally:
        client.delete(queue, f"_kombu.binding.{queue}")


class Worker:
    """`celery -A workers worker --concurrency N` at default flush settings, warmed up."""

    def __init__(self, store: Any, spec: Any, warm_dir: Path, checkpoint: str, db_url: str, args: Any,
                 tmp: Path) -> None:
        from producer.publish import Publisher
        from stage_a.settings import Settings

        self.store, self.spec, self.args = store, spec, args
        self.queue = f"stage_a_bench_{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_FLUSH")}
        env.update(STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=self.queue, STAGE_A_DATABASE_URL=db_url,
                   STAGE_A_CHECKPOINT=checkpoint, STAGE_A_DEVICE=args.device, STAGE_A_GPUS="",
                   STAGE_A_RECLAIM_INTERVAL="3600", STAGE_A_ORPHAN_GRACE="3600", STAGE_A_LEASE_SECONDS="3600")
        if args.device.startswith("cuda"):
            env["STAGE_A_GPUS"] = ",".join(str(i) for i in range(args.processes))
        self.log = tmp / f"worker-{self.queue}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", f"bench-{self.queue}@%h",
                 "--concurrency", str(args.processes), "--pool", "prefork", "--loglevel", "WARNING"],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.publisher = Publisher(replace(Settings.from_env(), broker_url=REDIS_URL, queue=self.queue))
        self.warm_dir = warm_dir

    def __enter__(self) -> Worker:
        w0 = time.perf_counter()
        warm = register(self.store, self.spec, self.warm_dir, farm=True)
        self.publisher.publish_items(self.store.unfinished_items(warm.id), "per_image", self.store.store_id, warm.route)
        wait_done(self.store, warm.id, warm.n_images, self.args.timeout, self.proc, self.log)
        print(f"  (worker start + model load + warm-up: {time.perf_counter() - w0:.1f} s, not counted)", flush=True)
        return self

    def measure(self, input_dir: Path) -> tuple[float, list[int]]:
        """images/s from the first publish to the last commit, and images per pool process (most first)."""
        run = register(self.store, self.spec, input_dir, farm=True)
        items = self.store.unfinished_items(run.id)
        t0 = time.perf_counter()
        self.publisher.publish_items(items, self.spec.sharding_mode, self.store.store_id, run.route,
                                    self.spec.batch_size)
        t1 = wait_done(self.store, run.id, len(items), self.args.timeout, self.proc, self.log)
        split = sorted(Counter(r["worker"] for r in image_rows(self.store, run.id)).values(), reverse=True)
        print(f"  farm, 1 worker x {self.args.processes} pool processes: {len(items)} images in {t1 - t0:.1f} s = "
              f"{len(items) / (t1 - t0):.2f} images/s; images per pool process {split}", flush=True)
        return len(items) / (t1 - t0), split

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.environ.get("STAGE_A_CHECKPOINT"),
                    help="model folder (default: the tiny random-weight Qwen3-VL)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=153)
    ap.add_argument("--batch-size", type=int, default=8, help="the run's model batch size")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2, help="pool processes of the one worker")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--bytes-images", type=int, default=100_000, help="images of the Redis bytes measurement")
    ap.add_argument("--bytes-only", action="store_true")
    args = ap.parse_args()
    print(machine_line())
    redis_bytes_per_image(args.bytes_images)
    if args.bytes_only:
        return

    from engine.loader import load_model
    from engine.steploop import StepLoop
    from engine.transformers_engine import TransformersEngine
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.store import ResultStore

    checkpoint = args.checkpoint or str(tiny_checkpoint())
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-balance-"))
    input_dir = make_input(args.images, tmp / "input")
    warm_dir = make_input(args.batch_size, tmp / "warm")
    gen = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root="", checkpoint=checkpoint, sharding_mode="per_image",
                   batch_size=args.batch_size, generation=gen)
    print(f"model: {checkpoint} on {args.device}; {args.images} images, per_image batches of {args.batch_size}, "
          f"{args.max_new_tokens} new tokens per image; worker flush settings: defaults")
    ratios: list[float] = []
    gaps: list[int] = []
    with pg_database("stage_a_bench_balance") as db_url:
        store = ResultStore(db_url)
        loop = StepLoop(TransformersEngine(load_model(Checkpoint.open(checkpoint), args.device)), store, "bench-engine")
        warm = register(store, spec, warm_dir, farm=False)
        loop.run(warm, store.unfinished_items(warm.id))
        try:
            with Worker(store, spec, warm_dir, checkpoint, db_url, args, tmp) as worker:
                for _ in range(args.rounds):
                    run = register(store, spec, input_dir, farm=False)
                    items = store.unfinished_items(run.id)
                    t0 = time.perf_counter()
                    n = loop.run(run, items)
                    e = n / (time.perf_counter() - t0)
                    print(f"  engine alone (StepLoop.run, as `stage-a run`): {n} images = {e:.2f} images/s", flush=True)
                    f, split = worker.measure(input_dir)
                    ratios.append(f / e)
                    gaps.append(split[0] - split[-1] if len(split) == args.processes else split[0])
                    print(f"  farm / engine alone = {f / e:.2f}", flush=True)
        finally:
            store.close()
    ratios.sort()
    print(f"\n{machine_line()}")
    print(f"farm ({args.processes} pool processes, default flush) / engine alone, median of {len(ratios)} rounds = "
          f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}..{ratios[-1]:.2f}) -> target >= 0.9: "
          f"{'MET' if statistics.median(ratios) >= 0.9 else 'NOT MET'}; most-least images per pool process by "
          f"round {gaps} (one model batch = {args.batch_size})")


if __name__ == "__main__":
    main()
