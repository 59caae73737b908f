"""The engine on a GPU with a production-shaped Qwen3-VL (random bf16 weights): images/s, tokens/s, memory.

    python bench/gpu.py                         # Qwen3-VL-2B-Instruct shape, batch sizes 8,16,32,64, on cuda
    python bench/gpu.py --shape 4b              # Qwen3-VL-4B-Instruct shape
    python bench/gpu.py --tiny                  # the tiny model on the CPU (proves the script runs anywhere)
    python bench/gpu.py --smoke --device cpu    # 2B widths, 2 text layers / 3 vision blocks, CPU: a shape check
    python bench/gpu.py --engine vllm           # the vLLM engine (random weights via load_format=dummy)
    python bench/gpu.py --engine vllm --tiny    # the vLLM engine on the tiny head_dim-32 model, CPU

The weights are random (no download; the published config's shapes), so summaries are noise,
but every FLOP and byte is the real model's. The processor (image resize, chat template) is the
product's; its tokenizer is the tiny model's (a smaller BPE vocabulary, so the Chinese prompt is
~1100 tokens where Qwen's tokenizer makes it shorter: the prefill here is a bit pessimistic).
Each batch goes through TransformersEngine.prepare + TransformersEngine.generate with greedy decoding and
min_new_tokens = max_new_tokens, so every row generates exactly that many tokens. Figures per
batch size: generate images/s and generated tokens/s (the model's own limit), prepare images/s
on one CPU thread (what one prefetch thread feeds), and the peak GPU memory of the batch.

With --engine vllm the same batches go through VllmEngine (one LLM.generate call per batch,
min_tokens = max_tokens); the model folder holds only the config and processor and vLLM builds
random weights (load_format="dummy"). vLLM reserves --gpu-memory-utilization of the GPU up front,
so the memory column is the process's peak torch allocation, not a per-batch need.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, machine_line, peak_rss_mib, tiny_checkpoint, write_tree  # noqa: E402

# Published shapes (Qwen3-VL-{2B,4B}-Instruct config.json): text model and vision tower.
SHAPES = {
    "2b": {"text": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=6144),
           "vision_out": 2048},
    "4b": {"text": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=9728),
           "vision_out": 2560},
}
VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
              deepstack_visual_indexes=[5, 11, 17])
SIZES = [(1600, 1200), (1200, 1600), (1920, 1080), (1024, 768), (2048, 1536), (1280, 720), (800, 600), (1080, 1920)]


def model_config(shape: str, processor: Any, smoke: bool) -> Any:
    """Qwen3VLConfig with the published shape (the tiny tokenizer's special token ids)."""
    from transformers import Qwen3VLConfig

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|endoftext|>")}
    text = dict(SHAPES[shape]["text"], vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
                hidden_act="silu", tie_word_embeddings=True, pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(VISION, out_hidden_size=SHAPES[shape]["vision_out"])
    if smoke:  # same widths, a few layers: checks shapes and the code path cheaply
        text["num_hidden_layers"] = 2
        vision.update(depth=3, deepstack_visual_indexes=[0, 1, 2])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def random_model(shape: str, processor: Any, device: str, dtype: Any, smoke: bool) -> Any:
    """Qwen3VLForConditionalGeneration with the published shape, random weights, built on ``device``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    config = model_config(shape, processor, smoke)
    attn = "sdpa"
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval(), attn


def vllm_engine(args: argparse.Namespace, tiny: str, device: str, max_batch: int) -> tuple[Any, str]:
    """VllmEngine on the tiny checkpoint, or on a config-only folder with vLLM's random (dummy) weights."""
    from dataclasses import replace

    from transformers import AutoProcessor

    from engine.loader import force_left_padding
    from engine.vllm_engine import load_vllm_engine
    from stage_a.checkpoint import Checkpoint
    from stage_a.settings import Settings

    settings = replace(Settings.from_env(), vllm_max_num_seqs=max_batch,
                       vllm_gpu_memory_utilization=args.gpu_memory_utilization)
    if args.tiny:
        return (load_vllm_engine(Checkpoint.open(tiny), device, settings),
                f"tiny random Qwen3-VL, head_dim 32 ({tiny}), vLLM")
    processor = AutoProcessor.from_pretrained(tiny)
    force_left_padding(processor)
    folder = Path(tempfile.mkdtemp(prefix=f"stage-a-bench-{args.shape}-"))
    model_config(args.shape, processor, args.smoke).save_pretrained(folder)
    processor.save_pretrained(folder)
    engine = load_vllm_engine(Checkpoint.open(folder), device, settings, load_format="dummy")
    return engine, (f"Qwen3-VL-{args.shape.upper()} shape{' (smoke)' if args.smoke else ''}, random weights "
                    f"(vLLM load_format=dummy), bf16, vLLM max_num_seqs {max_batch}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU instead")
    ap.add_argument("--smoke", action="store_true", help="published widths but 2 text layers / 3 vision blocks")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--batch-sizes", default=None, help="default 8,16,32,64 (1,2,4,8 with --tiny/--smoke)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (8 with --tiny/--smoke)")
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per batch size")
    ap.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="vLLM only")
    args = ap.parse_args()

    import torch

    from engine.loader import LoadedModel, force_left_padding, load_model
    from engine.transformers_engine import TransformersEngine
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.work import ImageKey, WorkItem

    small = args.tiny or args.smoke
    device = args.device or ("cpu" if args.tiny else "cuda")
    sizes = [int(b) for b in (args.batch_sizes or ("1,2,4,8" if small else "8,16,32,64")).split(",")]
    max_new = args.max_new_tokens or (8 if small else 128)
    tiny = str(tiny_checkpoint(head_dim=32 if args.engine == "vllm" else 16))
    t0 = time.perf_counter()
    if args.engine == "vllm":
        engine, what = vllm_engine(args, tiny, device, max(sizes))
        on_device = torch.device(device)
    elif args.tiny:
        loaded = load_model(Checkpoint.open(tiny), device)
        on_device = loaded.device
        what = f"tiny random Qwen3-VL ({tiny})"
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(tiny)
        force_left_padding(processor)
        dtype = torch.bfloat16
        model, attn = random_model(args.shape, processor, device, dtype, args.smoke)
        loaded = LoadedModel(model=model, processor=processor, device=torch.device(device), dtype=dtype,
                             checkpoint=f"random-{args.shape}", adapter=False, attn_implementation=attn,
                             fingerprint=f"random-{args.shape}")
        on_device = loaded.device
        n_params = sum(p.numel() for p in model.parameters())
        what = (f"Qwen3-VL-{args.shape.upper()} shape{' (smoke: 2 text layers, 3 vision blocks)' if args.smoke else ''}, "
                f"random bf16 weights, {n_params / 1e9:.2f} B parameters, attention {attn}")
    build_s = time.perf_counter() - t0
    if args.engine == "transformers":
        engine = TransformersEngine(loaded)
    on_cuda = on_device.type == "cuda"

    root = Path(tempfile.mkdtemp(prefix="stage-a-bench-gpu-"))
    n_img = max(sizes)
    groups = [(f"QC-GPU-{g:04d}", "pass", [SIZES[(4 * g + i) % len(SIZES)] for i in range(4)])
              for g in range((n_img + 3) // 4)]
    write_tree(root, groups)
    items = [WorkItem(ImageKey(1, g, i), f"{MISSION}/审核通过/{gid}/{gid}-{i}.jpg")
             for g, (gid, _, s) in enumerate(groups) for i in range(1, len(s) + 1)][:n_img]
    gen = GenerationParams(max_new_tokens=max_new, min_new_tokens=max_new)
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root=str(root), sharding_mode="per_image",
                   batch_size=n_img, generation=gen)
    ctx = engine.context(1, spec)
    print(machine_line())
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name(on_device)}")
    print(f"model: {what} on {on_device} (built in {build_s:.1f} s)")
    print(f"images: {len(set(SIZES))} camera sizes {min(SIZES)}..{max(SIZES)} at max_pixels {spec.max_pixels}; "
          f"greedy, {max_new} new tokens per image (min_new_tokens = max_new_tokens)")
    print(f"{'batch':>5} {'prompt':>7} {'generate img/s':>15} {'tokens/s':>9} {'prepare img/s':>14} {'peak mem':>12}")
    for b in sizes:
        batch = items[:b]
        prepared = engine.prepare(ctx, batch)
        engine.generate(prepared)  # warm-up: allocator, kernels, autotuning
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        gen_s = prep_s = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prepared = engine.prepare(ctx, batch)
            t1 = time.perf_counter()
            results = engine.generate(prepared)  # synchronizes the device before returning
            gen_s += time.perf_counter() - t1
            prep_s += t1 - t0
            assert all(r.completion_tokens == max_new for r in results), [r.completion_tokens for r in results]
        n = b * args.repeats
        mem = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU" if on_cuda
               else f"{peak_rss_mib() / 1024:.2f} GiB RSS")
        print(f"{b:>5} {max(r.prompt_tokens or 0 for r in results):>7} {n / gen_s:>15.2f} {n * max_new / gen_s:>9.1f} "
              f"{n / prep_s:>14.2f} {mem:>12}", flush=True)
    print(machine_line())


if __name__ == "__main__":
    main()
