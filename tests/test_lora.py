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

from engine.loader import load_model
from engine.transformers_engine import TransformersEngine
from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.work import ImageKey, WorkItem

MISSION = "RRU安装检查"


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter on q_proj/v_proj of the language model, with random non-zero B (it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(123)
    n_b = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
                n_b += 1
            elif "lora_A" in name:
                p.normal_(0.0, 0.5)
    assert n_b == 2 * 2  # 2 decoder layers x (q_proj, v_proj); the vision tower has none
    out = tmp_path_factory.mktemp("adapters") / "lora"
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(tiny_checkpoint)
    cfg_path.write_text(json.dumps(data))
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


def summarize(loaded: Any, root: Path) -> list[str]:
    engine = TransformersEngine(loaded)
    spec = RunSpec(mission=MISSION, dataset="rru", input_root=str(root), batch_size=4,
                   generation=GenerationParams(max_new_tokens=12))
    ctx = engine.context(1, spec)
    items = [WorkItem(ImageKey(1, 0, i + 1), f"p{i}.jpg") for i in range(3)]
    results = sorted(engine.generate(engine.prepare(ctx, items)), key=lambda r: r.key)
    for r in results:
        assert r.error is None, r.error
    return [r.raw_text or "" for r in results]


@pytest.mark.slow
def test_lora_adapter_loads_and_generates(adapter_dir: Path, tiny_loaded: Any, image_root: Path) -> None:
    loaded = load_model(Checkpoint.open(adapter_dir), "cpu")
    assert loaded.adapter is True
    assert loaded.checkpoint == str(adapter_dir)
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.truncation_side == "left"
    # Merged at load: a plain model, no LoRA layers left in the forward pass.
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    texts = summarize(loaded, image_root)
    assert all(t.strip() for t in texts)
    # The adapter really is applied: its outputs differ from the base model's.
    assert texts != summarize(tiny_loaded, image_root)


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
    loaded = load_model(Checkpoint.open(copy), "cpu")
    assert loaded.adapter is True
    assert loaded.tokenizer.padding_side == "left"  # the shipped config says right
    assert summarize(loaded, image_root) == summarize(load_model(Checkpoint.open(adapter_dir), "cpu"), image_root)


def test_lora_missing_base_model_is_a_user_error(adapter_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lora_nobase"
    shutil.copytree(adapter_dir, copy)
    data = json.loads((copy / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (copy / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="base model"):
        load_model(Checkpoint.open(copy), "cpu")


def test_missing_checkpoint_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_model(Checkpoint.open(tmp_path / "nothing-here"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter"):
        load_model(Checkpoint.open(tmp_path / "empty"), "cpu")
