"""A LoRA adapter made with peft on a tiny Qwen3-VL, with random non-zero weights (it changes outputs)."""

from __future__ import annotations

import json
from pathlib import Path


def make_adapter(base: Path, out: Path, seed: int = 123, rank: int = 4) -> Path:
    """A rank-``rank`` adapter on q_proj/v_proj of ``base``'s language model (A and B random, non-zero),
    saved to ``out`` naming ``base`` absolutely."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(data))
    return out
