"""Helpers shared by the benchmarks (not part of the product): images, trees, the tiny model, machine info."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # `python bench/x.py` from a checkout works without installing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))  # tests/: the helpers bench shares with the tests (tests/support)

MISSION = "挡风板安装检查"  # a bbu mission (max_pixels 1,048,576)
PASS_DIR, FAIL_DIR = "审核通过", "审核不通过"
PG_ADMIN_URL = os.environ.get("STAGE_A_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("STAGE_A_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def cache_dir() -> Path:
    from stage_a.settings import Settings

    return Settings.from_env().cache_path


def machine_line() -> str:
    """CPU count and load average: on a shared 2-core box every figure depends on them."""
    load = os.getloadavg()
    import platform

    extra = ""
    if "torch" in sys.modules:  # never import torch just to report it
        extra = f", torch threads {sys.modules['torch'].get_num_threads()}"
    return (f"machine: {platform.node()}, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}{extra}")


def tiny_checkpoint(head_dim: int = 16) -> Path:
    """The product's own tiny random-weight Qwen3-VL, built once in the stage-a cache (head_dim 32: vLLM's CPU)."""
    from engine.tiny_model import cached_tiny_checkpoint

    return cached_tiny_checkpoint(cache_dir() / "models", head_dim=head_dim)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM is this program's own peak; getrusage's ru_maxrss would also carry the
    parent's RSS at fork over an exec (a parent holding torch would inflate every child).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _photo(width: int, height: int, seed: int) -> Any:
    """A photo-like image: smooth random colour field plus sensor-like noise (JPEG-codes like a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def photo_file(width: int, height: int, seed: int, quality: int = 90) -> Path:
    """A cached JPEG of the given size (generated once; trees hard-link it)."""
    folder = cache_dir() / "bench-images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{width}x{height}-s{seed}-q{quality}.jpg"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        _photo(width, height, seed).save(tmp, format="JPEG", quality=quality)
        tmp.rename(path)
    return path


def write_tree(root: Path, groups: Iterable[tuple[str, str, list[tuple[int, int]]]], distinct: int = 8) -> Path:
    """``root/<MISSION>/<label dir>/<gid>/<gid>-<i>.jpg`` from (gid, "pass"/"fail", [(w, h), ...]).

    Images of one size share ``distinct`` different cached files (seeded by image index), linked
    (or copied) into the tree, so a big tree costs little disk and no re-encoding.
    """
    root = Path(root)
    for gid, label, sizes in groups:
        folder = root / MISSION / (PASS_DIR if label == "pass" else FAIL_DIR) / gid
        folder.mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes, start=1):
            src = photo_file(w, h, (zlib.crc32(gid.encode()) + i) % distinct)
            dst = folder / f"{gid}-{i}.jpg"
            if dst.exists():
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return root


@contextmanager
def pg_database(prefix: str = "stage_a_bench") -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

