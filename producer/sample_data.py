"""Generate a small, realistic-shaped input tree (the embedded demo and the tests use it)."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

PASS_DIR, FAIL_DIR = "审核通过", "审核不通过"
_SIZES = [(320, 240), (240, 320), (480, 270), (200, 200), (640, 360), (150, 420), (256, 192), (96, 96)]


def _photo(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A synthetic 'photo': colour blocks, so different files give different pixels and hashes."""
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, min(w, x0 + rng.randrange(8, w)), min(h, y0 + rng.randrange(8, h)))
        img.paste(tuple(rng.randrange(256) for _ in range(3)), box)
    return img


def make_sample_tree(root: Path, mission: str, n_fail: int = 3, n_pass: int = 3, seed: int = 0) -> Path:
    """Write ``root/<mission>/{审核不通过,审核通过}/<group>/*.jpg``; one group id is resubmitted."""
    rng = random.Random(seed)
    base = Path(root) / mission
    for label_dir, n, tag in ((FAIL_DIR, n_fail, "F"), (PASS_DIR, n_pass, "P")):
        for g in range(n):
            # The first pass group reuses the first fail group's id: a resubmission.
            gid = "QC-DEMO-20241206-0000001" if g == 0 else f"QC-DEMO-20241206-{tag}{g:06d}"
            folder = base / label_dir / gid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(1, rng.randint(2, 4) + 1):
                ext = ".JPG" if (g + i) % 5 == 0 else ".jpg"
                _photo(rng, rng.choice(_SIZES)).save(folder / f"{gid}-{i}{ext}", format="JPEG", quality=85)
    return Path(root)
