"""Nightly reuse (issue 21): second-night wall time over first-night wall time, `stage-a run` as users run it.

Nights over one SQLite store, each a `stage-a run` subprocess (process start, discovery, registration,
model load when needed, export all included):

  first    every image summarized (the store is empty)
  same     the tree unchanged                      -> target: >= 20x faster than first
  plus1    1% new images (a new group)             -> target: within 2x of `alone`
  alone    only that 1% summarized, on a fresh store (the time to summarize the 1% alone)

`same` and `plus1` run with the stat pre-check (STAGE_A_REUSE_PRECHECK=1, the default: unchanged files
are not read) and without it (=0: every file's bytes are hashed), side by side.

    python bench/reuse.py --images 400
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import FAIL_DIR, MISSION, PASS_DIR, ROOT, _photo, machine_line, tiny_checkpoint  # noqa: E402


def write_group(root: Path, index: int, per_group: int, size: tuple[int, int], seed: int) -> int:
    """One group of distinct photo-like JPEGs (every image its own bytes: no duplicate to fold)."""
    gid = f"QC-BENCH-20240101-{index:07d}"
    folder = root / MISSION / (FAIL_DIR if index % 2 else PASS_DIR) / gid
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, per_group + 1):
        _photo(*size, seed=seed + index * 1000 + i).save(folder / f"{gid}-{i}.jpg", format="JPEG", quality=90)
    return per_group


def night(tree: Path, out: Path, db: Path, checkpoint: Path, args: argparse.Namespace, **env: str) -> float:
    cmd = [sys.executable, "-m", "cli.main", "run", "--mission", MISSION, "--input-dir", str(tree),
           "--checkpoint", str(checkpoint), "--output-dir", str(out), "--db", str(db), "--device", "cpu",
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=out.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage-a run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="Images of the first night (groups of 4).")
    ap.add_argument("--size", default="1600x1200", help="Photo size (camera photos are larger; hashing scales with it).")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    assert len(size) == 2
    checkpoint = tiny_checkpoint()
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="stage-a-reuse-") as tmp:
        work = Path(tmp)
        tree, db = work / "tree", work / "results.db"
        groups = args.images // 4
        for g in range(groups):
            write_group(tree, g, 4, size, seed=0)
        new_images = max(1, args.images // 100)

        def add_new(start: int) -> Path:
            """1% new images: new groups in the nightly tree, the same groups alone in a tree of their own."""
            alone = work / f"alone-{start}"
            left, g = new_images, start
            while left > 0:
                n = min(4, left)
                write_group(tree, g, n, size, seed=7)
                write_group(alone, g, n, size, seed=7)
                left -= n
                g += 1
            return alone

        time.sleep(0.2)  # files older than the racy window (stage_a.reuse.RACY_NS)
        t = {"first": night(tree, work / "out1", db, checkpoint, args)}
        t["same, pre-check"] = night(tree, work / "out2", db, checkpoint, args)
        t["same, hash every file"] = night(tree, work / "out3", db, checkpoint, args, STAGE_A_REUSE_PRECHECK="0")
        alone = add_new(groups)
        time.sleep(0.2)
        t["+1%, pre-check"] = night(tree, work / "out4", db, checkpoint, args)
        t["1% alone (a)"] = night(alone, work / "out5", work / "alone-a.db", checkpoint, args)
        alone = add_new(groups + 1000)
        time.sleep(0.2)
        t["+1%, hash every file"] = night(tree, work / "out6", db, checkpoint, args, STAGE_A_REUSE_PRECHECK="0")
        t["1% alone (b)"] = night(alone, work / "out7", work / "alone-b.db", checkpoint, args)
    print(f"{args.images} images {args.size} JPEG q90 in groups of 4, 1% = {new_images} new images; tiny model on "
          f"the CPU, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}; wall time of `stage-a run`")
    for name, s in t.items():
        print(f"  {name:24s} {s:8.2f} s")
    print("ratios (first night / second night; 1% night / 1% alone):")
    for mode in ("pre-check", "hash every file"):
        alone_s = t["1% alone (a)"] if mode == "pre-check" else t["1% alone (b)"]
        print(f"  {mode:16s} unchanged: {t['first'] / t[f'same, {mode}']:6.1f}x faster (target >= 20x)   "
              f"+1%: {t[f'+1%, {mode}'] / alone_s:5.2f}x the 1% alone (target <= 2x)")


if __name__ == "__main__":
    main()
