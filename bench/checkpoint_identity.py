"""What a checkpoint's identity costs on a folder shaped like a real one (several multi-GB shards).

`Checkpoint.open` runs where a run is registered, when a worker starts or switches model, and after
each load (the folder must not have changed while it loaded). The identity hashes every byte of every
weight and config file (BLAKE3 on all cores, the next chunk read while one is hashed), so its first
cost grows with the size of the checkpoint; the per-file digests are then cached by stat, so a
restarted process reads nothing.

Three figures, each over the whole folder:

- cold: the shards' pages evicted from the page cache first (fsync + posix_fadvise DONTNEED per file,
  which needs no root and leaves other processes' cache alone): disk speed;
- warm: the shards in the page cache, no digest cache: hashing speed;
- cached by stat: a fresh digest-cache read as a restarted worker does it (no file content read).

The shards are real data (not sparse), written under ``--dir`` and deleted afterwards.

    python bench/checkpoint_identity.py --shards 4 --shard-gib 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine_line  # noqa: F401  (puts the checkout on sys.path)

from stage_a.checkpoint import _RACY_NS, Checkpoint, hashed

_BLOCK = 64 << 20


def make_folder(root: Path, shards: int, shard_bytes: int) -> Path:
    folder = root / "qwen3-vl-8b-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "architectures": ["Qwen3VL"]}))
    index = {"weight_map": {f"layer.{i}": f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    block = bytearray(os.urandom(_BLOCK))
    for i in range(shards):
        with (folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as fh:
            left, n = shard_bytes, 0
            while left > 0:
                block[:16] = f"{i:08d}{n:08d}".encode()  # no two blocks alike
                fh.write(block[:min(left, _BLOCK)])
                left -= _BLOCK
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
    return folder


def evict(folder: Path) -> None:
    """Drop the folder's pages from the page cache (clean pages only: written and fsynced above)."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], str], repeats: int) -> tuple[list[float], str, int]:
    """Seconds per call, the identity, and the bytes hashed per call."""
    times, identity, before = [], "", hashed.bytes
    for _ in range(repeats):
        t0 = time.perf_counter()
        identity = fn()
        times.append(time.perf_counter() - t0)
    return times, identity, (hashed.bytes - before) // repeats


def report(what: str, times: list[float], read: int, total: int) -> None:
    med = statistics.median(times)
    rate = f"{total / med / 1e9:.2f} GB/s" if read else "no file content read"
    print(f"{what:<16} median {med:9.4f} s  min {min(times):9.4f} s  over {len(times):2d}  "
          f"{read / 2**30:6.2f} GiB hashed per open  ({rate})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the folder is written (default: the temp dir)")
    args = ap.parse_args()
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-ckpt-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        folder = make_folder(tmp, args.shards, int(args.shard_gib * 2**30))
        total = sum(f.stat().st_size for f in folder.iterdir())
        print(f"checkpoint: {args.shards} shards x {args.shard_gib:g} GiB = {total / 2**30:.2f} GiB of real data "
              f"in {tmp} (written in {time.perf_counter() - t0:.1f} s)")
        cache = tmp / "identity-cache"

        times, identity, read = [], "", 0
        for _ in range(args.repeats):  # evicting inside the timed call would count the fsync too
            evict(folder)
            t, identity, read = timed(lambda: Checkpoint.open(folder).identity, 1)
            times += t
        report("cold (evicted)", times, read, total)
        Checkpoint.open(folder)  # everything in the page cache
        times, warm_id, read = timed(lambda: Checkpoint.open(folder).identity, args.repeats)
        report("warm page cache", times, read, total)
        while time.time_ns() <= max(f.stat().st_ctime_ns for f in folder.iterdir()) + _RACY_NS:
            time.sleep(0.01)  # files this fresh are never cached (see stage_a/checkpoint.py)
        Checkpoint.open(folder, cache)  # fills the digest cache
        times, cached_id, read = timed(lambda: Checkpoint.open(folder, cache).identity, max(args.repeats, 20))
        report("cached by stat", times, read, total)
        assert identity == warm_id == cached_id, (identity, warm_id, cached_id)
        print(f"identity {identity}")
        shard = folder / f"model-{args.shards:05d}-of-{args.shards:05d}.safetensors"
        with shard.open("r+b") as fh:  # a drift after the first MiB, same size, mtime put back
            st = os.fstat(fh.fileno())
            fh.seek(shard.stat().st_size - 4096)
            fh.write(b"another fine-tune")
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        t, changed, read = timed(lambda: Checkpoint.open(folder, cache).identity, 1)
        print(f"after rewriting 17 bytes near the end of the last shard (mtime put back): identity {changed} "
              f"({'differs' if changed != identity else 'SAME: BUG'}); {read / 2**30:.2f} GiB hashed again in "
              f"{t[0]:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
