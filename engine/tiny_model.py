"""Build a tiny random-weight Qwen3-VL checkpoint: the embedded default and the test model.

It is a real Qwen3-VL (same classes, real image/video processors, a BPE tokenizer with the Qwen
special tokens and a ChatML template) with a toy size, so everything that loads a production
checkpoint loads this one the same way. Its summaries are meaningless: the weights are random.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the recipe changes so cached copies are rebuilt.
TINY_MODEL_VERSION = "3"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML as Qwen3-VL renders it; images become vision_start/image_pad/vision_end and the
# generation prompt honours enable_thinking=False with an empty think block (Qwen3 convention).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)

_FILLER = [
    "<DOMAIN=bbu>, <TASK=挡风板安装检查>",
    "<DOMAIN=rru>, <TASK=RRU安装检查>",
    '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["无"]}',
    '{"统计": [{"类别": "站点距离", "文本": {"约50米": 1}}], "分组统计": []}',
    "无关图片",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def _corpus() -> list[str]:
    try:
        from engine.prompts import prompt_corpus

        texts = list(prompt_corpus())
    except Exception:  # prompt data missing must not stop building a test model
        log.warning("prompt corpus unavailable; tiny tokenizer trained on filler text only")
        texts = []
    return texts + _FILLER * 20


def _build_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        # Deliberately the wrong side: the engine must force left padding whatever ships.
        padding_side="right",
        model_max_length=32768,
    )


# head_dim -> mrope sections (t, h, w), which must sum to head_dim / 2. 16 is the default recipe;
# 32 is the smallest head size vLLM's CPU attention backend accepts (its tests use that variant).
MROPE_SECTIONS = {16: [2, 3, 3], 32: [4, 6, 6]}


def build_tiny_checkpoint(out_dir: Path, seed: int = 0, vocab_size: int = 1200, head_dim: int = 16) -> Path:
    """Write a tiny Qwen3-VL checkpoint (model, processor, tokenizer, template) to ``out_dir``."""
    if head_dim not in MROPE_SECTIONS:
        raise ValueError(f"head_dim must be one of {sorted(MROPE_SECTIONS)}, got {head_dim}")
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 32768,
            # mrope sections (t, h, w) must sum to head_dim / 2
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": MROPE_SECTIONS[head_dim],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Random init is small (std 0.02); widen the output head so greedy decoding is decisive
    # rather than a near-tie, which keeps tiny-model summaries stable across batch shapes.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir)

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": 16777216},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    marker: dict[str, object] = {"version": TINY_MODEL_VERSION, "seed": seed, "random_weights": True}
    if head_dim != 16:  # the default recipe's marker stays as it always was
        marker["head_dim"] = head_dim
    (out_dir / "STAGE_A_TINY_MODEL.json").write_text(json.dumps(marker) + "\n")
    return out_dir


def cached_tiny_checkpoint(cache_dir: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """The tiny checkpoint in ``cache_dir``, built once and reused while its recipe is current.

    Another ``seed`` gives another model (other weights, other summaries), another ``head_dim`` the
    variant vLLM's CPU backend needs (32); each in its own folder (``tiny-qwen3-vl-v3`` is the default).
    """
    suffix = (f"-seed{seed}" if seed else "") + ("" if head_dim == 16 else f"-hd{head_dim}")
    target = Path(cache_dir) / f"tiny-qwen3-vl-v{TINY_MODEL_VERSION}{suffix}"
    if (target / "STAGE_A_TINY_MODEL.json").is_file():
        return target
    tmp = target.with_name(target.name + ".building")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_checkpoint(tmp, seed=seed, head_dim=head_dim)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic publish: a half-built model is never picked up
    return target
