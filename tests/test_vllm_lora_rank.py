"""How the vLLM engine sizes LoRA serving from an adapter folder (no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.vllm_engine import vllm_lora_rank
from stage_a.checkpoint import Checkpoint


def test_adapter_rank_is_the_largest_of_rank_pattern(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base), "r": 8, "rank_pattern": {"q_proj": 24}}))
    ckpt = Checkpoint.open(adapter)
    assert (ckpt.base, ckpt.lora_rank) == (base.resolve(), 24)


def test_vllm_lora_rank_is_one_vllm_accepts() -> None:
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 12, 24, 64, 100)] == [8, 8, 8, 16, 32, 64, 128]
