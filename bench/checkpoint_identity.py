"""How long a checkpoint's identity takes on a folder shaped like a real one (several multi-GB shards).

`Checkpoint.open` runs where a run is registered, when a worker starts or switches model, and after
each load (the folder must not have changed while it loaded). It reads the config files, and per
weight shard its name, size and first megabyte: the cost grows with the number of shards, not
their size. The shards here are sparse files (`truncate`), so the disk holds only what is written.

    python bench/checkpoint_identity.py --shards 8 --shard-gib 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine_line  # noqa: F401  (puts the checkout on sys.path)

from stage_a.checkpoint import Checkpoint


def make_folder(root: Path, shards: int, shard_bytes: int) -> Path:
    folder = root / "qwen3-vl-8b-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "architectures": ["Qwen3VL"]}))
    index = {"weight_map": {f"layer.{i}": f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for i in range(shards):
        f = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with f.open("wb") as fh:
            fh.write(os.urandom(1 << 20))  # a header and leading tensors that differ between fine-tunes
        os.truncate(f, shard_bytes)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-gib", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="stage-a-bench-ckpt-") as tmp:
        folder = make_folder(Path(tmp), args.shards, int(args.shard_gib * 2**30))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            identity = Checkpoint.open(folder).identity
            times.append(time.perf_counter() - t0)
        total = args.shards * args.shard_gib
        print(f"checkpoint: {args.shards} shards x {args.shard_gib:g} GiB = {total:g} GiB (sparse), identity {identity}")
        print(f"Checkpoint.open: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms "
              f"over {args.repeats} opens (page cache warm); reads {args.shards} MiB of weights")
        (folder / f"model-00001-of-{args.shards:05d}.safetensors").open("r+b").write(b"another fine-tune")
        changed = Checkpoint.open(folder).identity
        print(f"after overwriting the first bytes of shard 1: identity {changed} ({'differs' if changed != identity else 'SAME: BUG'})")


if __name__ == "__main__":
    main()
