"""The core generation invariants on the real tiny Qwen3-VL, loaded through the product's loader.

Greedy summaries must not depend on batch size or batch neighbours (SPEC section 4). Images of
different resolutions give prompts of different lengths, so this only holds with left padding;
the right-padding variant below proves the comparison would catch the bug.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.images import header_size, load_image
from engine.loader import load_model
from engine.transformers_engine import RunContext, TransformersEngine
from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.work import ImageKey, ImageResult, WorkItem

MISSION = "挡风板安装检查"
MAX_NEW_TOKENS = 14
# (width, height): every one gives a different image_grid_thw, hence a different prompt length.
SIZES = [(64, 48), (200, 150), (97, 301), (320, 240), (50, 50), (300, 96), (128, 256), (256, 64)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine_images")
    for i, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(1000 + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def items() -> list[WorkItem]:
    return [WorkItem(ImageKey(1, 0, i + 1), f"img_{i}.png") for i in range(len(SIZES))]


def make_spec(root: Path, temperature: float = 0.0, max_new_tokens: int = MAX_NEW_TOKENS) -> RunSpec:
    return RunSpec(mission=MISSION, dataset="bbu", input_root=str(root), batch_size=8,
                   generation=GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature))


@pytest.fixture(scope="module")
def engine(tiny_loaded: Any) -> TransformersEngine:
    return TransformersEngine(tiny_loaded)


@pytest.fixture(scope="module")
def ctx(engine: TransformersEngine, image_root: Path) -> RunContext:
    return engine.context(1, make_spec(image_root))


def run_batches(engine: TransformersEngine, ctx: RunContext, items: list[WorkItem], batch_size: int) -> dict[int, ImageResult]:
    out: dict[int, ImageResult] = {}
    for i in range(0, len(items), batch_size):
        for r in engine.generate(engine.prepare(ctx, items[i:i + batch_size])):
            assert r.key.image_index not in out
            out[r.key.image_index] = r
    assert sorted(out) == sorted(it.key.image_index for it in items)
    return out


@pytest.fixture(scope="module")
def one_at_a_time(engine: TransformersEngine, ctx: RunContext, items: list[WorkItem]) -> dict[int, ImageResult]:
    return run_batches(engine, ctx, items, 1)


def test_reference_results_are_meaningful(one_at_a_time: dict[int, ImageResult]) -> None:
    for r in one_at_a_time.values():
        assert r.error is None, r.error
        assert r.raw_text and r.summary
    # Different images give different text, so a row swap or a neighbour leak would show.
    assert len({r.raw_text for r in one_at_a_time.values()}) >= 2


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_left_padded_batches_equal_one_at_a_time(
    engine: TransformersEngine, ctx: RunContext, items: list[WorkItem], one_at_a_time: dict[int, ImageResult],
    batch_size: int,
) -> None:
    assert engine.processor.tokenizer.padding_side == "left"
    if batch_size == 1:  # a fresh run of single images must reproduce itself exactly
        got = run_batches(engine, ctx, items, 1)
    else:
        got = run_batches(engine, ctx, list(reversed(items)), batch_size)  # other neighbours too
    for idx, ref in one_at_a_time.items():
        r = got[idx]
        assert (r.raw_text, r.summary) == (ref.raw_text, ref.summary), f"image {idx} {SIZES[idx - 1]}"
        assert (r.prompt_tokens, r.vision_tokens, r.completion_tokens) == (
            ref.prompt_tokens, ref.vision_tokens, ref.completion_tokens)


def test_tiny_temperature_is_greedy(engine: TransformersEngine, image_root: Path, items: list[WorkItem],
                                    one_at_a_time: dict[int, ImageResult]) -> None:
    ctx = engine.context(2, make_spec(image_root, temperature=1e-5))
    got = run_batches(engine, ctx, items, 8)
    assert {k: r.raw_text for k, r in got.items()} == {k: r.raw_text for k, r in one_at_a_time.items()}


def test_checkpoint_generation_config_does_not_change_decoding(
    tiny_checkpoint: Path, tmp_path: Path, image_root: Path, items: list[WorkItem],
    one_at_a_time: dict[int, ImageResult],
) -> None:
    """Decoding is the run's GenerationParams (SPEC section 4), whatever the checkpoint's
    generation_config.json says: Qwen3-VL checkpoints ship sampling defaults and a repetition
    penalty, which must not be applied on top of the run's own."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    gen_cfg = json.loads((ckpt / "generation_config.json").read_text())
    gen_cfg.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.5,
                   no_repeat_ngram_size=2, min_new_tokens=6, num_beams=2, bad_words_ids=[[7], [11]],
                   suppress_tokens=[5, 9], sequence_bias=[[[3], -5.0]])
    (ckpt / "generation_config.json").write_text(json.dumps(gen_cfg))
    engine = TransformersEngine(load_model(Checkpoint.open(ckpt), "cpu"))
    got = run_batches(engine, engine.context(1, make_spec(image_root)), items, 8)
    assert {k: r.raw_text for k, r in got.items()} == {k: r.raw_text for k, r in one_at_a_time.items()}


def test_right_padding_breaks_the_invariant(
    engine: TransformersEngine, ctx: RunContext, items: list[WorkItem], one_at_a_time: dict[int, ImageResult],
) -> None:
    """The same comparison with the tokenizer forced to right padding must fail for some image."""
    tok = engine.processor.tokenizer
    saved = tok.padding_side
    try:
        tok.padding_side = "right"
        batch = engine.prepare(ctx, items)
        mask = batch.inputs["attention_mask"]
        assert bool((mask[:, 0] == 1).all()) and bool((mask[:, -1] == 0).any())  # really right padded
        got = {r.key.image_index: r for r in engine.generate(batch)}
    finally:
        tok.padding_side = saved
    assert tok.padding_side == "left"
    differing = [i for i, ref in one_at_a_time.items() if got[i].raw_text != ref.raw_text]
    assert differing, "right padding gave the same texts: the invariant test could not catch the bug"


def test_right_padded_checkpoint_still_loads_left_padded(
    tiny_checkpoint: Path, image_root: Path, items: list[WorkItem],
) -> None:
    cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert cfg.get("padding_side") == "right"  # the checkpoint ships the wrong side on purpose
    loaded = load_model(Checkpoint.open(tiny_checkpoint), "cpu")
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.truncation_side == "left"
    assert loaded.adapter is False
    engine = TransformersEngine(loaded)
    batch = engine.prepare(engine.context(1, make_spec(image_root)), items)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert bool((mask[:, -1] == 1).all())  # every row ends with real tokens
    assert bool((mask[:, 0] == 0).any())  # the shorter rows start with padding
    for row in range(ids.shape[0]):
        n_pad = int((mask[row] == 0).sum())
        assert bool((mask[row, :n_pad] == 0).all()) and bool((mask[row, n_pad:] == 1).all())
        assert bool((ids[row, :n_pad] == engine.pad_id).all())
    assert sorted(int(n) for n in mask.sum(dim=1)) == sorted(batch.prompt_tokens)


def test_token_counts(one_at_a_time: dict[int, ImageResult]) -> None:
    for r in one_at_a_time.values():
        assert r.completion_tokens is not None and 1 <= r.completion_tokens <= MAX_NEW_TOKENS
        assert r.prompt_tokens and r.vision_tokens and r.prompt_tokens > r.vision_tokens
    # Same text prompt for every image: prompt tokens = fixed text tokens + vision tokens.
    assert len({r.prompt_tokens - r.vision_tokens for r in one_at_a_time.values()}) == 1
    vision = {SIZES[i - 1]: r.vision_tokens for i, r in one_at_a_time.items()}
    assert len(set(vision.values())) >= 4
    assert vision[(320, 240)] > vision[(200, 150)] > vision[(50, 50)]


def test_vision_token_estimate_matches_processor(engine: TransformersEngine, ctx: RunContext, items: list[WorkItem],
                                                 one_at_a_time: dict[int, ImageResult]) -> None:
    """The per_image scheduler's header-only estimate is what the processor really produces."""
    for it in items:
        assert engine.estimate_cost(ctx, it) == one_at_a_time[it.key.image_index].vision_tokens


# ---- stop tokens -----------------------------------------------------------------------------


@pytest.fixture()
def forced_engine(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """A private copy of the model whose lm_head emits a scripted token sequence per row."""
    loaded = load_model(Checkpoint.open(tiny_checkpoint), "cpu")
    engine = TransformersEngine(loaded)
    script: dict[str, Any] = {"rows": [], "step": 0}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        step = script["step"]
        script["step"] += 1
        out = output.clone()
        for row, tokens in enumerate(script["rows"]):
            out[row, -1, :] = -1e4
            out[row, -1, tokens[min(step, len(tokens) - 1)]] = 1e4
        return out

    handle = loaded.model.lm_head.register_forward_hook(hook)
    try:
        yield engine, script
    finally:
        handle.remove()


def test_stops_at_qwen_stop_tokens_and_trims(forced_engine: Any, image_root: Path, items: list[WorkItem]) -> None:
    engine, script = forced_engine
    tok = engine.processor.tokenizer
    a = tok.encode("BBU", add_special_tokens=False)[0]
    b = tok.encode("挡风板", add_special_tokens=False)[0]
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    vstart = tok.convert_tokens_to_ids("<|vision_start|>")
    script["rows"] = [
        [a, b, im_end],  # stops at <|im_end|> after 3 tokens; later steps are padding
        [a, vstart, b, a, eot],  # stops at <|endoftext|>; the special token is skipped in the text
        [im_end],  # nothing but the stop token: empty summary -> failure of that image
        [b],  # never stops: capped at max_new_tokens
    ]
    ctx = engine.context(1, make_spec(image_root, max_new_tokens=8))
    res = {r.key.image_index: r for r in engine.generate(engine.prepare(ctx, items[:4]))}
    r1, r2, r3, r4 = (res[i] for i in range(1, 5))
    assert r1.completion_tokens == 3 and r1.raw_text == tok.decode([a, b])
    assert r2.completion_tokens == 5 and r2.raw_text == tok.decode([a, b, a])
    assert "<|" not in (r1.raw_text + r2.raw_text)
    assert r3.completion_tokens == 1 and r3.raw_text == "" and r3.summary is None and r3.error
    assert not r3.ok
    assert r4.completion_tokens == 8 and r4.raw_text == tok.decode([b] * 8)
    assert r1.ok and r2.ok and r4.ok


# ---- verify_inputs ---------------------------------------------------------------------------


def test_verify_inputs_logs_first_batch_only(
    engine: TransformersEngine, image_root: Path, items: list[WorkItem], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    ctx = engine.context(3, make_spec(image_root), verify_inputs=True)
    first = engine.prepare(ctx, items[:3])
    engine.prepare(ctx, items[3:6])
    records = [r.getMessage() for r in caplog.records
               if r.name == "engine.verify_inputs" and "verify_inputs" in r.getMessage()]
    assert len(records) == 3
    for row, item in enumerate(first.items):
        line = next(m for m in records if item.rel_path in m)
        file_hash = hashlib.sha256((image_root / item.rel_path).read_bytes()).hexdigest()
        assert f"file_sha256={file_hash}" in line
        assert re.search(r"pixel_sha256=[0-9a-f]{64}\b", line)
        t, h, w = first.inputs["image_grid_thw"][row].tolist()
        assert f"image_grid_thw=({t}, {h}, {w})" in line
        assert f"vision_tokens={first.vision_tokens[row]} " in line
        assert line.endswith(f"prompt_tokens={first.prompt_tokens[row]}")
        width, height = SIZES[item.key.image_index - 1]
        assert f"size_before={width}x{height}" in line
        assert f"size_after={w * 16}x{h * 16}" in line
    pixel_hashes = {re.search(r"pixel_sha256=(\w+)", m).group(1) for m in records}  # type: ignore[union-attr]
    assert len(pixel_hashes) == 3
    assert not any(it.rel_path in m for it in items[3:] for m in records)


# ---- EXIF orientation ------------------------------------------------------------------------


def test_exif_orientation_applied_before_encoding(engine: TransformersEngine, tmp_path: Path) -> None:
    w, h = 200, 100
    rng = np.random.default_rng(7)
    stored = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rotated.jpg", format="JPEG", quality=90, exif=exif.tobytes())
    # Reference: the same decoded pixels rotated by hand, saved lossless without EXIF.
    with Image.open(tmp_path / "rotated.jpg") as im:
        assert im.size == (w, h)
        im.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")

    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size_before == (w, h)
    assert loaded.image.size == (h, w)
    assert header_size(tmp_path / "rotated.jpg") == (h, w)

    ctx = engine.context(4, make_spec(tmp_path))
    rot = engine.prepare(ctx, [WorkItem(ImageKey(4, 0, 1), "rotated.jpg")])
    ref = engine.prepare(ctx, [WorkItem(ImageKey(4, 0, 2), "upright.png")])
    grid = rot.inputs["image_grid_thw"][0].tolist()
    assert grid == ref.inputs["image_grid_thw"][0].tolist()
    assert grid[1] > grid[2]  # taller than wide: rotated (an unrotated 200x100 would be wider)
    assert grid == [1, 12, 6]  # smart_resize of 100x200 to multiples of 32 -> 96x192, 16px patches
    import torch

    assert torch.equal(rot.inputs["pixel_values"], ref.inputs["pixel_values"])
    assert engine.estimate_cost(ctx, rot.items[0]) == rot.vision_tokens[0]
