"""`stage-a run` against a plain sequential one-file runner, same checkpoint, images, prompt and tokens.

    python bench/baseline.py                            # tiny random-weight model on the CPU
    python bench/baseline.py --checkpoint /models/qwen3-vl-2b --device cuda --groups 200

The plain runner is what a one-file torchrun-style script does: load the checkpoint with
transformers, then for each group in order, for each slice of up to --batch-size of its images:
open the JPEGs with PIL, run the processor (left padding, so its output is right), generate,
decode. No prefetching, no length ordering, batches never span groups.

`stage-a run` is measured through its own machinery in this process: register the run (discover,
store), StepLoop.run (prefetching loader, per_image batches ordered by vision tokens) and
the export, on the same checkpoint and inputs. min_new_tokens = max_new_tokens (greedy) so both
generate exactly the same number of tokens per image. Model loading is timed separately; the
images/s compare processing only. Target (issue 6): stage-a >= 1.5x the plain runner.

Inspection photos are phone/camera JPEGs (1.9-12 MP) in groups of 1-3, which is what this
generates: decoding and resizing them is a large share of the work on a CPU, and per-group
batches are small.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, machine_line, tiny_checkpoint, write_tree  # noqa: E402
from support.store import image_rows  # noqa: E402

# Camera sizes: mostly 2 MP, some portrait/16:9, a 5 MP, a 12 MP, a small one.
SIZES = [(1600, 1200), (1200, 1600), (1920, 1080), (1600, 1200), (2560, 1920), (1600, 1200), (800, 600),
         (4000, 3000), (1280, 960), (1080, 1920)]
GROUP_SIZES = [2, 1, 3, 2, 1, 2, 3, 1, 2, 2]  # mean 1.9 images per group


def make_input(n_groups: int, root: Path) -> Path:
    k = 0
    groups = []
    for g in range(n_groups):
        n = GROUP_SIZES[g % len(GROUP_SIZES)]
        groups.append((f"QC-BASE-{g:05d}", "fail" if g % 3 == 0 else "pass",
                       [SIZES[(k + i) % len(SIZES)] for i in range(n)]))
        k += n
    return write_tree(root, groups, distinct=16)


# ---- the plain runner ------------------------------------------------------------------------------


def plain_runner(checkpoint: str, device: str, input_dir: Path, batch_size: int, max_new_tokens: int,
                 max_pixels: int) -> dict[str, Any]:
    """One file, no stage-a machinery: transformers + PIL, group by group."""
    import torch
    from PIL import Image, ImageOps
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine.prompts import build_prompt
    from producer.discovery import discover  # the same input order
    from stage_a.missions import get_mission

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"  # decoder-only batches must be left padded
    tok = processor.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[-1]
    prompt = build_prompt(get_mission(MISSION), "bbu")
    messages = [
        {"role": "system", "content": [{"type": "text", "text": prompt.system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.user}]},
    ]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ip = processor.image_processor
    min_pixels = int((ip.size or {}).get("shortest_edge") or 0)
    load_s = time.perf_counter() - t0

    found = discover(input_dir, MISSION)
    outputs: dict[str, str] = {}
    n_batches = 0

    def run_batch(paths: tuple[str, ...]) -> list[str]:
        images = []
        for rel in paths:
            with Image.open(input_dir / rel) as im:
                images.append(ImageOps.exif_transpose(im).convert("RGB"))
        inputs = processor(text=[chat] * len(images), images=images, padding=True, return_tensors="pt",
                           size={"longest_edge": max_pixels, "shortest_edge": min_pixels}).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 repetition_penalty=1.05, eos_token_id=stop_ids, pad_token_id=pad_id)
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    run_batch(found.groups[0].images[:1])  # warm-up (one-off allocations), as stage-a gets one
    t0 = time.perf_counter()
    for group in found.groups:
        for i in range(0, len(group.images), batch_size):
            paths = group.images[i:i + batch_size]
            outputs.update(zip(paths, run_batch(paths), strict=True))
            n_batches += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": len(outputs), "load_s": load_s, "batches": n_batches, "texts": outputs}


# ---- stage-a run ----------------------------------------------------------------------------------


def stage_a_run(checkpoint: str, device: str, input_dir: Path, batch_size: int, max_new_tokens: int,
                sharding: str, work: Path) -> dict[str, Any]:
    """`stage-a run`'s steps in-process: register, load, StepLoop.run (prefetch), export."""
    from engine.loader import load_model
    from engine.steploop import LoopHooks, StepLoop
    from engine.transformers_engine import TransformersEngine
    from merger.export import export_run
    from producer.register import register_run
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.store import ResultStore

    t0 = time.perf_counter()
    engine = TransformersEngine(load_model(Checkpoint.open(checkpoint), device))
    load_s = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    store = ResultStore(f"sqlite:///{work / 'stage_a_results.db'}")
    gen = GenerationParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root="", checkpoint=checkpoint, sharding_mode=sharding,
                   batch_size=batch_size, generation=gen)
    batches = 0

    def count(_: Any) -> None:
        nonlocal batches
        batches += 1

    from stage_a.work import ImageKey, WorkItem

    warm_ctx = engine.context(0, replace(spec, input_root=str(input_dir)))
    first = next((input_dir / MISSION).rglob("*.jpg")).relative_to(input_dir).as_posix()
    engine.generate(engine.prepare(warm_ctx, [WorkItem(ImageKey(0, 0, 1), first)]))  # warm-up, as above
    t0 = time.perf_counter()
    reg = register_run(store, spec, input_dir)
    run = store.get_run(reg.run_id)
    loop = StepLoop(engine, store)
    n = loop.run(run, store.unfinished_items(run.id), hooks=LoopHooks(after_batch=count))
    report = export_run(store, run.id, work)
    seconds = time.perf_counter() - t0
    texts = {r["rel_path"]: r["raw_text"] for r in image_rows(store, run.id)}
    store.close()
    return {"seconds": seconds, "images": n, "load_s": load_s, "batches": batches, "texts": texts,
            "written": report.groups_written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model folder (default: the tiny random-weight Qwen3-VL)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3,
                    help="plain / stage-a measurement pairs; the verdict is the median ratio")
    ap.add_argument("--also-per-group", action="store_true",
                    help="also time stage-a with per_group sharding (same batches as the plain runner)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    from stage_a.config import DEFAULT_MAX_PIXELS

    checkpoint = args.checkpoint or str(tiny_checkpoint())
    tmp = Path(tempfile.mkdtemp(prefix="stage-a-bench-baseline-"))
    input_dir = make_input(args.groups, tmp / "input")
    print(machine_line())
    n_files = sum(1 for _ in (input_dir / MISSION).rglob("*.jpg"))
    mb = sum(p.stat().st_size for p in (input_dir / MISSION).rglob("*.jpg")) / 2**20
    print(f"model: {checkpoint} on {args.device}; {args.groups} groups, {n_files} JPEGs ({mb:.0f} MiB, "
          f"{min(SIZES)}..{max(SIZES)} px); batch size {args.batch_size}; greedy, {args.max_new_tokens} new tokens "
          f"per image; {args.rounds} alternating rounds (the 2-core machine is shared: its load changes by the minute)")

    rates: dict[str, list[float]] = {"plain": [], "per_image": [], "per_group": []}
    ratios: list[float] = []
    for rnd in range(1, args.rounds + 1):
        print(f"\nround {rnd} ({machine_line().split(', ', 2)[2]}):")
        plain = plain_runner(checkpoint, args.device, input_dir, args.batch_size, args.max_new_tokens,
                             DEFAULT_MAX_PIXELS["bbu"])
        rates["plain"].append(plain["images"] / plain["seconds"])
        print(f"  plain runner:       {plain['images']} images in {plain['seconds']:.1f} s = "
              f"{rates['plain'][-1]:.2f} images/s ({plain['batches']} batches; model load "
              f"{plain['load_s']:.1f} s not counted)", flush=True)
        stage = stage_a_run(checkpoint, args.device, input_dir, args.batch_size, args.max_new_tokens, "per_image",
                            tmp / f"per_image{rnd}")
        rates["per_image"].append(stage["images"] / stage["seconds"])
        ratios.append(rates["per_image"][-1] / rates["plain"][-1])
        print(f"  stage-a per_image:  {stage['images']} images in {stage['seconds']:.1f} s = "
              f"{rates['per_image'][-1]:.2f} images/s ({stage['batches']} batches, registration and export "
              f"included; model load {stage['load_s']:.1f} s not counted) -> {ratios[-1]:.2f}x", flush=True)
        same = sum(plain["texts"].get(k) == v for k, v in stage["texts"].items())
        line = f"  identical outputs, plain vs per_image (other batch neighbours): {same}/{stage['images']}"
        if args.also_per_group:
            pg = stage_a_run(checkpoint, args.device, input_dir, args.batch_size, args.max_new_tokens, "per_group",
                             tmp / f"per_group{rnd}")
            rates["per_group"].append(pg["images"] / pg["seconds"])
            print(f"  stage-a per_group:  {pg['images']} images in {pg['seconds']:.1f} s = "
                  f"{rates['per_group'][-1]:.2f} images/s ({pg['batches']} batches: the plain runner's, plus "
                  f"prefetching) -> {rates['per_group'][-1] / rates['plain'][-1]:.2f}x", flush=True)
            same_pg = sum(plain["texts"].get(k) == v for k, v in pg["texts"].items())
            line += f"; plain vs per_group (same batches): {same_pg}/{pg['images']}"
        print(line)

    med = statistics.median

    ratio = med(ratios)
    figures = {k: med(v) for k, v in rates.items() if v}
    figures["ratio_median"] = ratio
    print(f"\n{machine_line()}")
    print("medians: " + ", ".join(f"{k} {v:.2f} images/s" for k, v in figures.items() if k != "ratio_median"))
    print(f"stage-a run / plain runner = {ratio:.2f}x (median of {len(ratios)} rounds; "
          f"{min(ratios):.2f}x..{max(ratios):.2f}x) -> target >= 1.5x: {'MET' if ratio >= 1.5 else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
