"""Control-plane benchmarks: enqueue 1M images, store + export 1M images / 200k groups, discover 100k files.

    python bench/control_plane.py                      # everything, SQLite and PostgreSQL
    python bench/control_plane.py --only enqueue       # or store / discover
    python bench/control_plane.py --only enqueue --enqueue-sizes 100000,1000000,10000000 --reference 0
    python bench/control_plane.py --only store --db sqlite --images 1000000 --group-size 5

Targets: enqueue 1,000,000 images < 60 s (issue 17; issue 6: 100,000 < 10 s); `stage-a enqueue`'s
registration + publishing of 10,000,000 images on PostgreSQL < 3 min with peak RSS < 500 MiB (issue
20: up to --tree-max from a real tree in /dev/shm, scan included; above it from a generated group
stream, the scan measured by --only discover); store results for 1,000,000 images and export
them as 200,000 groups < 60 s with peak memory < 1 GiB; discover 100,000 files < 10 s.
Each store phase runs in its own process so its peak RSS (getrusage) is its own; a realistic
worker commits one model batch per transaction (--result-batch), many workers in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, REDIS_URL, machine_line, peak_rss_mib, pg_database  # noqa: E402

SUMMARY = json.dumps({"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}, "挡风板": {"有": 1}}],
                      "备注": ["挡风板安装到位，螺丝紧固，无遮挡"]}, ensure_ascii=False)
GIB = 1024.0
STORE_ID = "0" * 32
"""A store id as long as a real one (uuid4 hex): messages carry it."""


def _gid(g: int) -> str:
    return f"QC-BENCH-20250101-{g:07d}"


def _groups(n_images: int, group_size: int) -> list[Any]:
    from stage_a.store import GroupInput

    out = []
    for g in range(n_images // group_size):
        label = "fail" if g % 4 == 0 else "pass"
        folder = f"{MISSION}/{'审核不通过' if label == 'fail' else '审核通过'}/{_gid(g)}"
        out.append(GroupInput(_gid(g), label, tuple(f"{folder}/{_gid(g)}-{i}.jpg" for i in range(1, group_size + 1))))
    return out


def _spec() -> Any:
    from stage_a.config import RunSpec

    return RunSpec(mission=MISSION, dataset="bbu", input_root="/data/bench", sharding_mode="per_image")


# ---- phases, each in its own process --------------------------------------------------------------


def _cpu() -> float:
    """CPU seconds of this process (not of the database server)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def phase_create(url: str, n_images: int, group_size: int) -> dict[str, Any]:
    from stage_a.store import ResultStore

    store = ResultStore(url)
    groups = _groups(n_images, group_size)
    c0, t0 = _cpu(), time.perf_counter()
    run_id = store.create_run(_spec(), groups, farm=True)
    dt = time.perf_counter() - t0
    return {"run_id": run_id, "seconds": dt, "cpu_seconds": _cpu() - c0, "rows": n_images, "groups": len(groups)}


def phase_record(url: str, run_id: int, n_images: int, group_size: int, batch: int, limit: int | None) -> dict[str, Any]:
    """Write a result for every image, ``batch`` per transaction (what workers do per model batch)."""
    from stage_a.store import ResultStore
    from stage_a.work import ImageKey, ImageResult

    store = ResultStore(url)
    n = n_images if limit is None else min(limit, n_images)
    c0, t0 = _cpu(), time.perf_counter()
    done = 0
    while done < n:
        chunk = []
        for k in range(done, min(done + batch, n)):
            g, i = divmod(k, group_size)
            chunk.append(ImageResult(key=ImageKey(run_id, g, i + 1), summary=SUMMARY, raw_text=SUMMARY,
                                     prompt_tokens=2100, completion_tokens=120, vision_tokens=1000,
                                     preprocess_ms=30.0, generate_ms=900.0))
        store.record_results(chunk, "bench-worker")
        done += len(chunk)
    dt = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": dt, "cpu_seconds": _cpu() - c0, "rows": done, "batch": batch}
    if limit is None:
        t1 = time.perf_counter()
        c = store.queries.counts(run_id)
        out["counts_seconds"] = time.perf_counter() - t1
        out["counts_ok"] = c.done == n_images and c.groups_done == n_images // group_size
    return out


def phase_export(url: str, run_id: int, out_dir: str, trace: bool) -> dict[str, Any]:
    from merger.export import export_run
    from stage_a.store import ResultStore

    store = ResultStore(url)
    if trace:
        import tracemalloc

        tracemalloc.start()
    c0, t0 = _cpu(), time.perf_counter()
    report = export_run(store, run_id, Path(out_dir))
    dt = time.perf_counter() - t0
    out = {"seconds": dt, "cpu_seconds": _cpu() - c0, "groups_written": report.groups_written,
           "groups_failed": report.groups_failed, "bytes": report.jsonl_path.stat().st_size}
    if trace:
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


def _group_stream(n_images: int, group_size: int) -> Any:
    """The groups of an n-image run, generated one at a time (the input a scan would stream)."""
    from stage_a.store import GroupInput

    for g in range(n_images // group_size):
        label = "fail" if g % 4 == 0 else "pass"
        folder = f"{MISSION}/{'审核不通过' if label == 'fail' else '审核通过'}/{_gid(g)}"
        yield GroupInput(_gid(g), label, tuple(f"{folder}/{_gid(g)}-{i}.jpg" for i in range(1, group_size + 1)))


def phase_enqueue(url: str, source: str, n_images: int, group_size: int, drain: bool) -> dict[str, Any]:
    """What `stage-a enqueue` does after its checks: register (a real tree through register_run, or a
    generated group stream through create_run), then publish the run's items streamed from the store.
    ``drain``: a thread empties the queue as it fills (the broker's memory is not measured here)."""
    import threading

    import redis

    from producer.publish import Publisher
    from stage_a.config import RunSpec
    from stage_a.settings import Settings
    from stage_a.store import ResultStore

    store = ResultStore(url)
    queue = f"stage_a_bench_{uuid.uuid4().hex[:8]}"
    pub = Publisher(Settings(broker_url=REDIS_URL, queue=queue))
    client = redis.Redis.from_url(REDIS_URL)
    stop = threading.Event()

    def drainer() -> None:
        while not stop.wait(0.2):
            client.delete(queue)

    c0, t0 = _cpu(), time.perf_counter()
    spec = _spec()
    if source == "list":
        run_id = store.create_run(spec, _group_stream(n_images, group_size), farm=True)
    else:
        from producer.register import register_run

        spec = RunSpec(mission=MISSION, dataset="bbu", input_root="", sharding_mode="per_image")
        run_id = register_run(store, spec, Path(source), farm=True).run_id
    t_reg = time.perf_counter() - t0
    rss_reg = peak_rss_mib()
    thread = threading.Thread(target=drainer, daemon=True)
    if drain:
        thread.start()
    t1 = time.perf_counter()
    try:
        sent = pub.publish_keys(store.iter_unfinished_keys(run_id), "per_image", store.store_id,  # as `stage-a enqueue`
                                batch_size=spec.batch_size)
    finally:
        stop.set()
        if drain:
            thread.join()
        length = client.llen(queue)
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    t_pub = time.perf_counter() - t1
    return {"register_seconds": t_reg, "publish_seconds": t_pub, "seconds": time.perf_counter() - t0,
            "cpu_seconds": _cpu() - c0, "sent": sent, "queued": length, "rss_after_register_mib": rss_reg}


def _phase(args: list[str]) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its JSON result carries its own peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the benchmarks -------------------------------------------------------------------------------


def bench_store(db: str, n_images: int, group_size: int, batch: int, small_batch: int) -> bool:
    print(f"\n== store + export: {n_images:,} images as {n_images // group_size:,} groups on {db} ==")
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-store-"))
    ctx: Any
    if db == "sqlite":
        from contextlib import nullcontext

        ctx = nullcontext(f"sqlite:///{tmp / 'bench.db'}")
    else:
        ctx = pg_database()
    try:
        with ctx as url:
            from stage_a.store import ResultStore

            ResultStore(url).close()  # schema once, outside the timings
            c = _phase(["create", url, str(n_images), str(group_size)])
            print(f"create_run (groups + pending images): {c['seconds']:.1f} s (CPU {c['cpu_seconds']:.1f} s) "
                  f"({c['rows'] / c['seconds']:,.0f} rows/s), peak RSS {c['peak_rss_mib']:.0f} MiB")
            if small_batch:  # a separate 50k-image run, so the big run's rows are all still pending
                n_small = min(n_images, 50_000)
                cs = _phase(["create", url, str(n_small), str(group_size)])
                s = _phase(["record", url, str(cs["run_id"]), str(n_small), str(group_size), str(small_batch), "all"])
                print(f"record_results, {small_batch} per transaction (one worker, {s['rows']:,}-image run): "
                      f"{s['rows'] / s['seconds']:,.0f} images/s")
            r = _phase(["record", url, str(c["run_id"]), str(n_images), str(group_size), str(batch), "all"])
            print(f"record_results, {batch} per transaction: {r['seconds']:.1f} s (CPU {r['cpu_seconds']:.1f} s; "
                  f"{r['rows'] / r['seconds']:,.0f} "
                  f"images/s), peak RSS {r['peak_rss_mib']:.0f} MiB")
            print(f"counts (stage-a status) on the finished run: {r['counts_seconds']:.2f} s, correct: {r['counts_ok']}")
            e = _phase(["export", url, str(c["run_id"]), str(tmp / "out"), "0"])
            print(f"export: {e['seconds']:.1f} s (CPU {e['cpu_seconds']:.1f} s), {e['groups_written']:,} groups written, "
                  f"{e['bytes'] / 2**20:.0f} MiB JSONL, peak RSS {e['peak_rss_mib']:.0f} MiB")
            et = _phase(["export", url, str(c["run_id"]), str(tmp / "out2"), "1"])
            print(f"export under tracemalloc: Python heap peak {et['tracemalloc_peak_mib']:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store_export = r["seconds"] + e["seconds"]
    peak = max(c["peak_rss_mib"], r["peak_rss_mib"], e["peak_rss_mib"])
    ok = store_export < 60 and peak < GIB and e["groups_written"] == n_images // group_size
    print(f"store results + export: {store_export:.1f} s (with create_run {store_export + c['seconds']:.1f} s), "
          f"peak RSS of any phase {peak:.0f} MiB -> target < 60 s and < 1 GiB: {'MET' if ok else 'NOT MET'}")
    return ok


def bench_enqueue(n_images: int, reference: int) -> bool:
    import redis

    from producer.publish import Publisher
    from stage_a.messages import payloads_for
    from stage_a.settings import Settings
    from stage_a.work import ImageKey, WorkItem

    print(f"\n== enqueue {n_images:,} images (per_image) to Redis {REDIS_URL} ==")
    queue = f"stage_a_bench_{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=REDIS_URL, queue=queue)
    client = redis.Redis.from_url(REDIS_URL)
    items = [WorkItem(ImageKey(1, k // 5, k % 5 + 1), f"{MISSION}/审核通过/{_gid(k // 5)}/{_gid(k // 5)}-{k % 5 + 1}.jpg")
             for k in range(n_images)]
    pub = Publisher(settings)
    try:
        t0 = time.perf_counter()
        sent = pub.publish_items(items, "per_image", STORE_ID)
        dt = time.perf_counter() - t0
        length = client.llen(queue)
        print(f"fast path (producer/publish.py): {sent:,} images in {dt:.2f} s = {sent / dt:,.0f} images/s, "
              f"{length:,} chunk messages")
        client.delete(queue)
        limit = max(10.0, 60.0 * n_images / 1_000_000)
        ok = dt < limit and sent == n_images
        if reference:
            payloads = list(payloads_for(items[:reference], "per_image", STORE_ID))
            t0 = time.perf_counter()
            pub.send(payloads)
            rdt = time.perf_counter() - t0
            print(f"reference (Celery create/send_task_message per message, kombu-pipelined): {reference:,} in "
                  f"{rdt:.2f} s = {reference / rdt:,.0f} msgs/s (=> {n_images / (reference / rdt):.0f} s for "
                  f"{n_images:,}); fast path is {(sent / dt) / (reference / rdt):.1f}x")
        gp = list(payloads_for(items, "per_group", STORE_ID))
        t0 = time.perf_counter()
        pub.publish(gp)
        gdt = time.perf_counter() - t0
        print(f"per_group: {len(gp):,} group messages for the same images in {gdt:.2f} s")
    finally:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    print(f"enqueue target < {limit:.0f} s for {n_images:,} images: {'MET' if ok else 'NOT MET'} ({dt:.2f} s)")
    return ok


def bench_enqueue_stream(sizes: list[int], group_size: int, tree_max: int) -> bool:
    """`stage-a enqueue`'s registration and publishing at each size on PostgreSQL, each in its own process
    (peak RSS is the phase's own): from a real tree in /dev/shm up to ``tree_max`` images (scan included),
    from a generated group stream above it. Target (issue 20): 10M < 3 min, peak < 500 MiB."""
    ok = True
    for n in sizes:
        tree = n <= tree_max
        base = Path(tempfile.mkdtemp(prefix="stage-a-bench-tree-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        try:
            if tree:
                _make_tree(base, n, group_size)
            with pg_database() as url:
                from stage_a.store import ResultStore

                ResultStore(url).close()  # schema once, outside the timings
                # Above 1M images the queue is emptied as it fills: the broker's bytes per image are
                # another benchmark's (a 10M-image queue of today's messages would not fit this machine).
                r = _phase(["enqueue", url, str(base) if tree else "list", str(n), str(group_size),
                            "1" if n > 1_000_000 else "0"])
        finally:
            shutil.rmtree(base, ignore_errors=True)
        target = 180.0 * n / 10_000_000
        met = r["sent"] == n and r["peak_rss_mib"] < 500 and (n < 10_000_000 or r["seconds"] < target)
        ok = ok and met
        print(f"enqueue {n:,} images ({'tree, scan included' if tree else 'generated group stream'}): "
              f"{r['seconds']:.1f} s (register {r['register_seconds']:.1f} s, publish {r['publish_seconds']:.1f} s; "
              f"CPU {r['cpu_seconds']:.1f} s), {r['sent']:,} images queued, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(after registering {r['rss_after_register_mib']:.0f} MiB) -> {'MET' if met else 'NOT MET'}")
    return ok


def _make_tree(base: Path, n_files: int, group_size: int) -> None:
    for g in range(n_files // group_size):
        folder = base / MISSION / ("审核不通过" if g % 4 == 0 else "审核通过") / _gid(g)
        folder.mkdir(parents=True)
        for i in range(1, group_size + 1):
            # names that need natural ordering: -1 .. -10 and mixed case extensions
            open(folder / f"{_gid(g)}-{i}{'.JPG' if i % 3 == 0 else '.jpg'}", "wb").close()


def bench_discover(n_files: int, group_size: int) -> bool:
    from producer.discovery import discover

    print(f"\n== discover {n_files:,} files ({n_files // group_size:,} groups) in /dev/shm ==")
    base = Path(tempfile.mkdtemp(prefix="stage-a-bench-tree-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        t0 = time.perf_counter()
        _make_tree(base, n_files, group_size)
        print(f"(building the tree took {time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        found = discover(base, MISSION)
        dt = time.perf_counter() - t0
        n = sum(len(g.images) for g in found.groups)
        print(f"discover: {n:,} files in {len(found.groups):,} groups in {dt:.2f} s ({n / dt:,.0f} files/s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ok = dt < 10 and n == n_files
    print(f"discovery target < 10 s: {'MET' if ok else 'NOT MET'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["enqueue", "store", "discover"], action="append")
    ap.add_argument("--enqueue-sizes", default="100000,1000000,10000000",
                    help="images per `stage-a enqueue` run (registration + publishing, PostgreSQL); empty = skip")
    ap.add_argument("--tree-max", type=int, default=1_000_000,
                    help="sizes up to this enqueue a real tree in /dev/shm (scan included); above: a generated group stream")
    ap.add_argument("--db", choices=["sqlite", "pg", "both"], default="both")
    ap.add_argument("--images", type=int, default=1_000_000, help="images stored and exported")
    ap.add_argument("--group-size", type=int, default=5)
    ap.add_argument("--result-batch", type=int, default=1000, help="results per record_results transaction")
    ap.add_argument("--small-batch", type=int, default=32, help="also time this batch (one worker's model batch) on 50k; 0 = skip")
    ap.add_argument("--enqueue-images", type=int, default=1_000_000)
    ap.add_argument("--reference", type=int, default=5000, help="messages through Celery's own send path, for comparison")
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    print(machine_line())
    which = args.only or ["enqueue", "store", "discover"]
    results = {}
    if "enqueue" in which:
        results["enqueue"] = bench_enqueue(args.enqueue_images, args.reference)
        sizes = [int(x) for x in args.enqueue_sizes.split(",") if x]
        if sizes:
            print(f"\n== stage-a enqueue (register + publish) on PostgreSQL, Redis {REDIS_URL} ==")
            results["enqueue/stream"] = bench_enqueue_stream(sizes, args.group_size, args.tree_max)
    if "discover" in which:
        results["discover"] = bench_discover(args.files, args.group_size)
    if "store" in which:
        for db in (["sqlite", "pg"] if args.db == "both" else [args.db]):
            results[f"store/{db}"] = bench_store(db, args.images, args.group_size, args.result_batch, args.small_batch)
    print("\n" + machine_line())
    print("summary: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in results.items()))


def _phase_main(argv: list[str]) -> None:
    kind, url = argv[0], argv[1]
    if kind == "create":
        out = phase_create(url, int(argv[2]), int(argv[3]))
    elif kind == "record":
        out = phase_record(url, int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]),
                           None if argv[6] == "all" else int(argv[6]))
    elif kind == "enqueue":
        out = phase_enqueue(url, argv[2], int(argv[3]), int(argv[4]), argv[5] == "1")
    else:
        out = phase_export(url, int(argv[2]), argv[3], argv[4] == "1")
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        _phase_main(sys.argv[2:])
    else:
        main()
