"""A LoRA adapter folder made with peft on the tiny Qwen3-VL loads through the product's loader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.hosting import build_engine
from engine.transformers_engine import TransformersEngine
from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.work import ImageKey, WorkItem

MISSION = "RRU安装检查"


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter on q_proj/v_proj of the language model, with random non-zero B (it changes outputs)."""
    from safetensors import safe_open
    from support.lora import make_adapter

    out = make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("adapters") / "lora")
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        n_b = sum(1 for k in f.keys() if "lora_B" in k)
    assert n_b == 2 * 2  # 2 decoder layers x (q_proj, v_proj); the vision tower has none
    assert not (out / "config.json").exists()  # a pure adapter folder
    assert not (out / "tokenizer_config.json").exists()  # processor comes from the base folder
    return out


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora_images")
    for i, (w, h) in enumerate([(96, 64), (160, 240), (320, 200)]):
        rng = np.random.default_rng(50 + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.jpg")
    return root


def summarize(engine: Any, root: Path) -> list[str]:
    spec = RunSpec(mission=MISSION, dataset="rru", input_root=str(root), batch_size=4,
                   generation=GenerationParams(max_new_tokens=12))
    ctx = engine.context(1, spec)
    items = [WorkItem(ImageKey(1, 0, i + 1), f"p{i}.jpg") for i in range(3)]
    results = sorted(engine.generate(engine.prepare(ctx, items)), key=lambda r: r.key)
    for r in results:
        assert r.error is None, r.error
    return [r.raw_text or "" for r in results]


def build(folder: Path) -> Any:
    return build_engine(Checkpoint.open(folder), "cpu", Settings())


@pytest.fixture(scope="module")
def second_adapter(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another adapter on the same base: the first one's weights negated (different outputs)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("adapters2") / "lora2"
    shutil.copytree(adapter_dir, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: (-v if "lora_B" in k else v) for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


@pytest.mark.slow
def test_lora_adapter_loads_and_generates(adapter_dir: Path, tiny_loaded: Any, image_root: Path) -> None:
    engine = build(adapter_dir)
    adapter = Checkpoint.open(adapter_dir)
    assert engine.fingerprint == adapter.identity and engine.base_fingerprint == adapter.base_identity
    assert engine.processor.tokenizer.padding_side == "left" and engine.processor.tokenizer.truncation_side == "left"
    texts = summarize(engine, image_root)
    assert all(t.strip() for t in texts)
    # The adapter really is applied: its outputs differ from the base model's.
    assert texts != summarize(TransformersEngine(tiny_loaded), image_root)


@pytest.mark.slow
def test_adapters_side_by_side_on_one_base_equal_their_own_engines(
    adapter_dir: Path, second_adapter: Path, tiny_checkpoint: Path, image_root: Path,
) -> None:
    """One engine serves the base and two adapters in turn, loading the base once: each gives exactly what
    an engine built for it alone gives (what a worker of the base model serves for a LoRA run)."""
    alone = {p: summarize(build(p), image_root) for p in (tiny_checkpoint, adapter_dir, second_adapter)}
    assert len({tuple(v) for v in alone.values()}) == 3  # three different models
    engine = build(tiny_checkpoint)
    model = engine.loaded.model
    for folder in (adapter_dir, second_adapter, tiny_checkpoint, adapter_dir, tiny_checkpoint):
        ckpt = Checkpoint.open(folder)
        engine.use_adapter(ckpt if ckpt.adapter else None)
        assert engine.fingerprint == ckpt.identity
        assert summarize(engine, image_root) == alone[folder], folder
    assert engine.loaded.model.base_model.model is model  # the base was never reloaded


@pytest.mark.slow
def test_lora_adapter_with_its_own_processor_and_relative_base(
    adapter_dir: Path, tiny_checkpoint: Path, tmp_path: Path, image_root: Path,
) -> None:
    """A copy that ships its processor files and names the base relative to the adapter folder."""
    from transformers import AutoProcessor

    copy = tmp_path / "lora_rel"
    shutil.copytree(adapter_dir, copy)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(copy)
    data = json.loads((copy / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = os.path.relpath(tiny_checkpoint, copy)
    (copy / "adapter_config.json").write_text(json.dumps(data))
    engine = build(copy)
    assert engine.processor.tokenizer.padding_side == "left"  # the shipped config says right
    assert summarize(engine, image_root) == summarize(build(adapter_dir), image_root)


def test_lora_missing_base_model_is_a_user_error(adapter_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lora_nobase"
    shutil.copytree(adapter_dir, copy)
    data = json.loads((copy / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (copy / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="base model"):
        build(copy)


def test_missing_checkpoint_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        build(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter"):
        build(tmp_path / "empty")
