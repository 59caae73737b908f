"""A two-model farm against one model alone: same workers, same number of images, routing by model.

    python bench/two_models.py                       # tiny models on the CPU, 2 workers, 3 rounds
    python bench/two_models.py --images 96 --rounds 5

Each round runs three farms of two `celery -A workers worker --concurrency 1` processes (Redis +
PostgreSQL, started the way an operator starts them), each given two runs of --images images:
- one model: both workers pinned to model A, both runs on model A (the reference);
- two models, pinned: one worker per model, one run per model (routing: each worker consumes only its
  model's queue, so nothing is handed back and no model is loaded twice);
- two models, unpinned: two workers with no STAGE_A_CHECKPOINT, one run per model (each worker picks a
  model's queue and keeps it while it has work; a switch is a model load, counted from the logs).
Pinned workers are warmed (model loaded, one batch run) before the clock starts; unpinned ones load
what routing gives them inside the measurement, as they would in production. The clock runs from
the first publish to the last committed result. Farms alternate within a round (the shared machine's
load changes by the minute); the median ratio over rounds is the verdict.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, REDIS_URL, ROOT, cache_dir, machine_line, pg_database, tiny_checkpoint  # noqa: E402
from farm_overhead import make_input, register, wait_done  # noqa: E402


class Farm:
    """Two workers on their own queue prefix: pinned to the given checkpoints, or unpinned (None)."""

    def __init__(self, db_url: str, pins: list[str | None], args: Any, tmp: Path) -> None:
        self.queue = f"stage_a_bench2_{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for i, pin in enumerate(pins):
            env = dict(os.environ, STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=self.queue, STAGE_A_DATABASE_URL=db_url,
                       STAGE_A_DEVICE=args.device, STAGE_A_GPUS="", STAGE_A_FLUSH_SIZE=str(args.flush_size),
                       STAGE_A_FLUSH_INTERVAL="0.2", STAGE_A_RECLAIM_INTERVAL="3600", STAGE_A_ORPHAN_GRACE="3600",
                       STAGE_A_LEASE_SECONDS="3600", OMP_NUM_THREADS=str(args.threads))
            env.pop("STAGE_A_CHECKPOINT", None)
            if pin:
                env["STAGE_A_CHECKPOINT"] = pin
            log = tmp / f"worker-{self.queue}-{i}.log"
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", f"w{i}-{self.queue}@%h",
                     "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO"],
                    env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            self.logs.append(log)

    def publisher(self) -> Any:
        from dataclasses import replace

        from producer.publish import Publisher
        from stage_a.settings import Settings

        return Publisher(replace(Settings.from_env(), broker_url=REDIS_URL, queue=self.queue))

    def loads(self) -> int:
        return sum(len(re.findall(r"\) loaded on ", log.read_text(errors="replace"))) for log in self.logs)

    def handed_back(self) -> int:
        return sum(log.read_text(errors="replace").count("handed ") for log in self.logs)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.queue}*")) + list(client.scan_iter(match=f"_kombu.binding.{self.queue}*"))
        if keys:
            client.delete(*keys)


def measure(store: Any, farm: Farm, specs: list[Any], input_dir: Path, warm_dir: Path | None, args: Any) -> float:
    """Warm pinned workers (one run per spec on warm_dir), then time two runs; returns images/s."""
    pub = farm.publisher()
    if warm_dir is not None:
        for spec in {s.checkpoint: s for s in specs}.values():
            warm = register(store, spec, warm_dir, farm=True)
            pub.publish_items(store.unfinished_items(warm.id), "per_image", store.store_id, warm.route)
            wait_done(store, warm.id, warm.n_images, args.timeout, farm.procs[0], farm.logs[0])
    runs = [register(store, spec, input_dir, farm=True) for spec in specs]
    items = [store.unfinished_items(r.id) for r in runs]
    t0 = time.perf_counter()
    for run, its in zip(runs, items, strict=True):
        pub.publish_items(its, "per_image", store.store_id, run.route)
    end = max(wait_done(store, r.id, len(its), args.timeout, farm.procs[0], farm.logs[0])
              for r, its in zip(runs, items, strict=True))
    return sum(len(i) for i in items) / (end - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=48, help="images per run (each farm gets two runs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--flush-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per worker")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    from engine.tiny_model import cached_tiny_checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.store import ResultStore

    model_a = str(tiny_checkpoint())
    model_b = str(cached_tiny_checkpoint(cache_dir() / "models", seed=1))
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-two-models-"))
    input_dir = make_input(args.images, tmp / "input")
    warm_dir = make_input(args.batch_size, tmp / "warm")
    gen = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)

    def spec(checkpoint: str) -> Any:
        return RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root="", checkpoint=checkpoint,
                       sharding_mode="per_image", batch_size=args.batch_size, generation=gen)

    print(machine_line())
    print(f"2 workers x 1 pool process, {args.threads} thread(s) each; 2 runs x {args.images} images, "
          f"batch {args.batch_size}, flush {args.flush_size}, {args.max_new_tokens} new tokens per image")
    farms = {
        "one model": ([model_a, model_a], [spec(model_a), spec(model_a)], True),
        "two models, pinned": ([model_a, model_b], [spec(model_a), spec(model_b)], True),
        "two models, unpinned": ([None, None], [spec(model_a), spec(model_b)], False),
    }
    rates: dict[str, list[float]] = {name: [] for name in farms}
    with pg_database("stage_a_bench_two_models") as db_url:
        store = ResultStore(db_url)
        try:
            for r in range(args.rounds):
                for name, (pins, specs, warm) in farms.items():
                    farm = Farm(db_url, pins, args, tmp)
                    try:
                        rate = measure(store, farm, specs, input_dir, warm_dir if warm else None, args)
                        loads, handed = farm.loads(), farm.handed_back()
                    finally:
                        farm.close()
                    rates[name].append(rate)
                    print(f"round {r + 1}, {name}: {rate:.2f} images/s ({loads} model loads, {handed} hand-backs)",
                          flush=True)
        finally:
            store.close()
    print(f"\n{machine_line()}")
    ref = statistics.median(rates["one model"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name}: median {med:.2f} images/s over {len(values)} rounds ({min(values):.2f}..{max(values):.2f}) "
              f"= {med / ref:.1%} of one model alone")


if __name__ == "__main__":
    main()
