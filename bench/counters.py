"""What the run counters (revision 0006's triggers) cost on the write path, and what they save on reads.

    python bench/counters.py                        # 200,000 images, PostgreSQL and SQLite
    python bench/counters.py --images 1000000 --db postgresql

Registers a run (create_run: COPY on PostgreSQL), then leases and records every image in model
batches of --batch (lease + record_results, one transaction each, like a worker), from --writers
threads at once. The same work runs with the counters' triggers on and with them disabled
(PostgreSQL: ALTER TABLE ... DISABLE TRIGGER USER; SQLite: the triggers dropped), alternating over
--rounds rounds; it prints the medians, and one status read (counters) against the old full count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import MISSION, machine_line, pg_database  # noqa: E402
from sqlalchemy import text  # noqa: E402

from stage_a.config import GenerationParams, RunSpec  # noqa: E402
from stage_a.store import GroupInput, ResultStore  # noqa: E402
from stage_a.work import ImageKey, ImageResult  # noqa: E402

FULL_COUNT = ("SELECT status, COUNT(*), SUM(preprocess_ms), SUM(generate_ms), SUM(completion_tokens) "
              "FROM images WHERE run_id = :r GROUP BY status")


def _groups(n_images: int, per: int = 4) -> list[GroupInput]:
    return [GroupInput(f"QC-B-20250101-{g:07d}", "pass", tuple(f"{MISSION}/p/{g}/{i}.jpg" for i in range(per)))
            for g in range(n_images // per)]


def _set_triggers(store: ResultStore, on: bool) -> None:
    with store.engine.begin() as c:
        if store.engine.dialect.name == "postgresql":
            for table in ("images", "groups"):
                c.execute(text(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER USER"))
        elif not on:
            for name in ("images_insert_counts", "images_update_counts", "images_delete_counts", "groups_insert_counts"):
                c.execute(text(f"DROP TRIGGER IF EXISTS {name}"))


def _round(url: str, n_images: int, batch: int, writers: int, counters: bool) -> dict[str, float]:
    store = ResultStore(url)
    _set_triggers(store, counters)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root="/data/in", checkpoint="/m/x",
                   generation=GenerationParams(max_new_tokens=16))
    groups = _groups(n_images)
    t0 = time.perf_counter()
    run = store.create_run(spec, groups, farm=True)
    register_s = time.perf_counter() - t0
    keys = [ImageKey(run, p, i) for p, g in enumerate(groups) for i in range(1, len(g.images) + 1)]
    stores = [ResultStore(url, migrate=False) for _ in range(writers)]

    def write(n: int) -> None:
        own = stores[n]
        for lo in range(n * batch, len(keys), writers * batch):
            chunk = keys[lo:lo + batch]
            own.lease(chunk, f"w{n}:1", 600)
            own.record_results([ImageResult(key=k, summary="{}", raw_text="{}", completion_tokens=20, prompt_tokens=900,
                                            preprocess_ms=3.0, generate_ms=40.0) for k in chunk], f"w{n}:1", model="m")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = store.queries.counts(run)
    read_counters_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    with store.engine.connect() as c:
        c.execute(text(FULL_COUNT), {"r": run}).all()
    read_full_ms = (time.perf_counter() - t0) * 1000
    if counters:
        assert counts.done == n_images, counts
    for s in stores:
        s.close()
    store.close()
    return {"register_s": register_s, "write_s": write_s, "read_counters_ms": read_counters_ms,
            "read_full_ms": read_full_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=128, help="images per lease + record transaction")
    ap.add_argument("--writers", type=int, default=4, help="threads writing at once (workers)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", choices=("postgresql", "sqlite", "both"), default="both")
    args = ap.parse_args()
    print(machine_line())
    backends = ["postgresql", "sqlite"] if args.db == "both" else [args.db]
    for backend in backends:
        results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for r in range(args.rounds):
            for counters in ((True, False) if r % 2 == 0 else (False, True)):
                if backend == "postgresql":
                    with pg_database("stage_a_bench_counters") as url:
                        results[counters].append(_round(url, args.images, args.batch, args.writers, counters))
                else:
                    import tempfile

                    with tempfile.TemporaryDirectory() as d:
                        results[counters].append(_round(f"sqlite:///{d}/r.db", args.images, args.batch,
                                                        1, counters))
        med: dict[bool, dict[str, Any]] = {k: {f: statistics.median(x[f] for x in v) for f in v[0]}
                                           for k, v in results.items()}
        on, off = med[True], med[False]
        print(f"{backend}: {args.images:,} images, batches of {args.batch}, "
              f"{args.writers if backend == 'postgresql' else 1} writer(s), median of {args.rounds}")
        print(f"  register (create_run): {on['register_s']:.2f} s with counters, {off['register_s']:.2f} s without "
              f"({on['register_s'] / off['register_s'] - 1:+.0%})")
        print(f"  lease + record all:    {on['write_s']:.2f} s with counters, {off['write_s']:.2f} s without "
              f"({on['write_s'] / off['write_s'] - 1:+.0%}); {args.images / on['write_s']:,.0f} images/s with")
        print(f"  one status read:       {on['read_counters_ms']:.1f} ms from the counters, "
              f"{on['read_full_ms']:.1f} ms for the old full count")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
