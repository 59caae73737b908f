"""Bad and unusual images: each summarizes or fails alone with a one-line reason.

Real files of every awkward kind (not mocks): at the engine level on one mixed batch, then
through `stage-a run`, where failed images put their group in the failure report and every
other group is exported.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.farm import FAIL, FAILURES, JSONL, MISSION, PASS, base_env, cli, read_jsonl

from stage_a.config import GenerationParams, RunSpec
from stage_a.work import ImageKey, WorkItem

# file name -> expected fragment of the one-line failure reason (None: must summarize)
CASES: dict[str, str | None] = {
    "zero.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "not an image file",
    "bomb.png": "decompression bomb",
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette_transparent.png": None,
    "exif_rotated.jpg": None,
    "one_pixel.png": None,
    "strip_10000x200.jpg": None,
    "thin_1x300.png": "aspect ratio",  # the processor refuses ratios over 200
}


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height (all black): tiny on disk, far over Pillow's pixel limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_cases(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    jpeg, png = _encode(photo, "JPEG"), _encode(photo, "PNG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text.jpg").write_bytes(b"Subject: site report\r\n\r\nthis is an e-mail, not a photo\r\n" * 20)
    bomb = _bomb_png(20_000, 20_000)
    assert 20_000 * 20_000 > 2 * Image.MAX_IMAGE_PIXELS and len(bomb) < 200_000
    (folder / "bomb.png").write_bytes(bomb)
    (folder / "cmyk.jpg").write_bytes(_encode(photo.convert("CMYK"), "JPEG"))
    gray16 = (np.linspace(0, 4000, 96 * 128).reshape(96, 128)).astype(np.uint16)  # dark 12-bit data
    (folder / "gray16.png").write_bytes(_encode(Image.fromarray(gray16), "PNG"))
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    (folder / "palette_transparent.png").write_bytes(_encode(pal, "PNG", transparency=0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 200x100, displayed portrait 100x200
    wide = Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
    (folder / "exif_rotated.jpg").write_bytes(_encode(wide, "JPEG", exif=exif.tobytes()))
    (folder / "one_pixel.png").write_bytes(_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    strip = Image.fromarray(rng.integers(0, 256, (200, 10_000, 3), dtype=np.uint8))
    (folder / "strip_10000x200.jpg").write_bytes(_encode(strip, "JPEG", quality=70))
    (folder / "thin_1x300.png").write_bytes(_encode(Image.new("RGB", (1, 300), (20, 100, 10)), "PNG"))


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad_images")
    write_cases(folder)
    return folder


def test_loader_normalizes_awkward_images(cases_dir: Path, tmp_path: Path) -> None:
    from engine.images import load_image

    exif = load_image(cases_dir / "exif_rotated.jpg")
    assert exif.size_before == (200, 100) and exif.image.size == (100, 200)  # rotated before encoding
    gray = np.asarray(load_image(cases_dir / "gray16.png").image)
    assert gray.max() == 4000 * 255 // 65535 and gray.min() == 0  # scaled from 16 bits, not clipped to white
    # Scaled by the format's range, not stretched by the image's own maximum: a uniform 16-bit
    # gray keeps its brightness (a stretch would turn any flat dark frame pure white).
    for value in (1000, 32768, 65535):
        flat = _encode(Image.fromarray(np.full((8, 8), value, dtype=np.uint16)), "PNG")
        (tmp_path / "flat16.png").write_bytes(flat)
        assert load_image(tmp_path / "flat16.png").image.getpixel((3, 3)) == (value * 255 // 65535,) * 3, value
    # An RGB PNG's tRNS colour key is transparency too: composited on white like the palette case.
    keyed = Image.new("RGB", (8, 8), (1, 2, 3))
    keyed.putpixel((0, 0), (200, 100, 50))
    (tmp_path / "keyed_rgb.png").write_bytes(_encode(keyed, "PNG", transparency=(1, 2, 3)))
    loaded = load_image(tmp_path / "keyed_rgb.png").image
    assert loaded.getpixel((3, 3)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (200, 100, 50)
    pal = load_image(cases_dir / "palette_transparent.png").image
    src = Image.open(cases_dir / "palette_transparent.png")
    transparent = np.argwhere(np.asarray(src) == 0)[0]  # a pixel of palette index 0 (transparent)
    assert pal.getpixel((int(transparent[1]), int(transparent[0]))) == (255, 255, 255)  # on white
    for name in ("cmyk.jpg", "one_pixel.png", "strip_10000x200.jpg"):
        assert load_image(cases_dir / name).image.mode == "RGB"


def test_loader_refuses_a_non_regular_file_without_blocking(tmp_path: Path) -> None:
    """A FIFO or a folder where an image was (replaced after discovery) fails at once, never hangs."""
    import os
    import threading

    from engine.images import ImageError, header_size, load_image

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "y.jpg"
    folder.mkdir()
    outcome: dict[str, object] = {}

    def probe() -> None:
        outcome["header"] = header_size(fifo)
        for path in (fifo, folder):
            try:
                load_image(path)
            except ImageError as exc:
                outcome[path.name] = str(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "reading a FIFO blocked"
    finally:
        if thread.is_alive():  # release the blocked reader (a writer opening and closing gives it EOF)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(10)
    assert outcome["header"] is None
    assert outcome["x.jpg"] == "not a regular file: x.jpg"
    assert outcome["y.jpg"] == "not a regular file: y.jpg"


def test_per_image_planning_survives_every_case(cases_dir: Path, tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    """The header-only cost estimate never raises: a bad image fails later, alone, in prepare."""
    from engine.scheduler import plan_batches
    from engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_loaded)
    ctx = engine.context(1, RunSpec(mission=MISSION, dataset="bbu", input_root=str(cases_dir)))
    items = [WorkItem(ImageKey(1, 0, i), name) for i, name in enumerate(CASES, start=1)]
    costs = {it.rel_path: engine.estimate_cost(ctx, it) for it in items}
    assert costs["thin_1x300.png"] == 0 and costs["zero.jpg"] == 0 and costs["one_pixel.png"] > 0
    planned = list(plan_batches(items, "per_image", 4, cost=lambda it: engine.estimate_cost(ctx, it)))
    assert sorted(it.key for b in planned for it in b) == sorted(it.key for it in items)


@pytest.mark.slow
def test_engine_mixed_batch_fails_only_the_bad_rows(cases_dir: Path, tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    from engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_loaded)
    spec = RunSpec(mission=MISSION, dataset="bbu", input_root=str(cases_dir),
                   generation=GenerationParams(max_new_tokens=4))
    ctx = engine.context(1, spec)
    names = list(CASES)
    items = [WorkItem(ImageKey(1, 0, i), name) for i, name in enumerate(names, start=1)]
    batch = engine.prepare(ctx, items)
    results = {names[r.key.image_index - 1]: r for r in engine.generate(batch)}
    assert sorted(results) == sorted(names)  # every row back exactly once
    for name, fragment in CASES.items():
        r = results[name]
        if fragment is None:
            assert r.ok and r.summary, (name, r.error)
        else:
            assert not r.ok and r.error and fragment in r.error and "\n" not in r.error, (name, r.error)
            assert name in r.error  # the reason names the file
    # EXIF rotation happened before the processor: the patch grid is portrait (rows > columns).
    row = [it.rel_path for it in batch.items].index("exif_rotated.jpg")
    _, grid_h, grid_w = batch.inputs["image_grid_thw"][row].tolist()
    assert grid_h > grid_w
    # The bad rows never reached the model: the good rows alone give the very same summaries.
    good = [it for it in items if CASES[it.rel_path] is None]
    alone = {names[r.key.image_index - 1]: r.summary for r in engine.generate(engine.prepare(ctx, good))}
    assert alone == {n: r.summary for n, r in results.items() if r.ok}


@pytest.mark.slow
def test_stage_a_run_reports_bad_images_and_exports_the_rest(cases_dir: Path, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    root = tmp_path / "in"
    good = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    bad = [n for n, f in CASES.items() if f is not None]
    fine = [n for n, f in CASES.items() if f is None]
    # One fail group per bad file, each beside a good photo; the awkward-but-fine files in pass groups.
    failed_groups = {}
    for i, name in enumerate(bad):
        gid = f"QC-BAD-20240101-{i:07d}"
        d = root / MISSION / FAIL / gid
        d.mkdir(parents=True)
        good.save(d / "a_good.jpg")
        (d / f"b_{name}").write_bytes((cases_dir / name).read_bytes())
        failed_groups[gid] = name
    ok_groups = []
    for i in range(0, len(fine), 2):
        gid = f"QC-OK-20240101-{i:07d}"
        d = root / MISSION / PASS / gid
        d.mkdir(parents=True)
        for name in fine[i:i + 2]:
            (d / name).write_bytes((cases_dir / name).read_bytes())
        ok_groups.append(gid)

    out = tmp_path / "out"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(root), "--output-dir", str(out), "--checkpoint",
                str(tiny_checkpoint), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4"],
               base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache")), tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # some groups not written
    assert f"{len(ok_groups)} groups written, {len(bad)} groups failed, 0 incomplete" in proc.stdout
    assert "Traceback" not in proc.stderr
    records = read_jsonl(out / JSONL)
    assert [r["group_id"] for r in records] == ok_groups
    assert all(v for r in records for v in r["per_image"].values())
    failures = read_jsonl(out / FAILURES)
    assert [f["group_id"] for f in failures] == list(failed_groups)
    for f in failures:
        name = failed_groups[f["group_id"]]
        # Only the bad image is listed; its good neighbour in the same batch was summarized.
        assert [(i["image"], i["file"]) for i in f["images"]] == [("image_2", f"b_{name}")], f
        reason = f["images"][0]["reason"]
        assert CASES[name] in reason and "\n" not in reason, reason


def test_a_huge_file_fails_without_being_read_whole(tmp_path: Path) -> None:
    """A multi-GB file named .jpg (sparse here) is refused by size after reading at most the limit."""
    import tracemalloc

    from engine.images import MAX_FILE_BYTES, ImageError, load_image

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(4 * 2**30)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"file too large: huge.jpg \(over 256 MiB\)"):
            load_image(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_FILE_BYTES + 2**24, peak
