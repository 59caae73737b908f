"""Engine throughput by batch size, and how much padding length-ordered batching saves.

    python bench/batching.py                          # tiny random-weight model on the CPU
    python bench/batching.py --checkpoint /models/qwen3-vl-2b --device cuda --images 256

On a fixed set of mixed-resolution JPEGs, with greedy decoding and min_new_tokens =
max_new_tokens (every row generates exactly that many tokens), it prints per batch size:
images/s of `generate` alone, of `prepare` (decode + resize + tokenize) alone and of both in
sequence, generated tokens/s, and the padding fraction (pad tokens / all prompt tokens) of
per_image batches planned without and with length ordering (workers/scheduler.plan_batches
with and without the vision-token cost). Target (issue 6): ordering at least halves padding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, machine_line, tiny_checkpoint, write_tree  # noqa: E402

# A mixed set as phones and cameras produce it: landscape, portrait, small, large, panorama.
SIZES = [(1600, 1200), (320, 240), (1200, 1600), (640, 480), (1920, 1080), (480, 640), (1024, 768),
         (400, 300), (2048, 1536), (800, 800), (1280, 720), (720, 1280), (960, 720), (2400, 1080),
         (360, 360), (1536, 2048)]


def image_set(n: int, root: Path) -> list[Any]:
    """``n`` images cycling through SIZES, as work items of one run (groups of 4)."""
    from stage_a.work import ImageKey, WorkItem

    groups = []
    for g in range((n + 3) // 4):
        sizes = [SIZES[(4 * g + i) % len(SIZES)] for i in range(min(4, n - 4 * g))]
        groups.append((f"QC-BATCH-{g:05d}", "pass", sizes))
    write_tree(root, groups)
    return [WorkItem(ImageKey(1, g, i), f"{MISSION}/审核通过/{gid}/{gid}-{i}.jpg")
            for g, (gid, _, sizes) in enumerate(groups) for i in range(1, len(sizes) + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model folder (default: the tiny random-weight Qwen3-VL)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--unordered-at", type=int, default=8,
                    help="also time this batch size without length ordering (0 = skip)")
    args = ap.parse_args()

    from support.batches import padding_fraction

    from engine.loader import load_model
    from engine.scheduler import plan_batches
    from engine.transformers_engine import TransformersEngine
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    checkpoint = args.checkpoint or str(tiny_checkpoint())
    root = Path(tempfile.mkdtemp(prefix="stage-a-bench-batching-"))
    items = image_set(args.images, root)
    engine = TransformersEngine(load_model(Checkpoint.open(checkpoint), args.device))
    gen = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root=str(root), checkpoint=checkpoint,
                   sharding_mode="per_image", batch_size=max(sizes), generation=gen)
    ctx = engine.context(1, spec)
    print(machine_line())
    used = sorted({SIZES[i % len(SIZES)] for i in range(len(items))}, key=lambda wh: wh[0] * wh[1])
    print(f"model: {checkpoint} on {engine.loaded.device}; {len(items)} JPEGs of {len(used)} sizes "
          f"({'x'.join(map(str, used[0]))} .. {'x'.join(map(str, used[-1]))} px), max_pixels {spec.max_pixels}; "
          f"greedy, {gen.max_new_tokens} new tokens per image (min_new_tokens = max_new_tokens)")

    # Exact prompt length of every image alone: the chat text plus its vision tokens.
    vision = {it.key: engine.estimate_cost(ctx, it) for it in items}
    one = engine.prepare(ctx, [items[0]])
    text_tokens = one.prompt_tokens[0] - one.vision_tokens[0]
    length = {k: text_tokens + v for k, v in vision.items()}
    print(f"prompt = {text_tokens} text tokens + {min(vision.values())}..{max(vision.values())} vision tokens")

    print("\npadding fraction (pad tokens / all prompt tokens), per_image batches:")
    print(f"{'batch':>5} {'unordered':>10} {'ordered':>9} {'cut':>6}")
    pad_ok = True
    for b in sizes:
        plain = padding_fraction([length[it.key] for it in batch] for batch in plan_batches(items, "per_image", b))
        ordered = padding_fraction([length[it.key] for it in batch] for batch in
                                   plan_batches(items, "per_image", b, cost=lambda it: vision[it.key]))
        cut = 1 - ordered / plain if plain else 0.0
        if b > 1:
            pad_ok &= ordered <= plain / 2
        print(f"{b:>5} {plain:>10.3f} {ordered:>9.3f} {cut:>6.0%}")

    def timed_pass(b: int, ordered: bool) -> dict[str, float]:
        batches = list(plan_batches(items, "per_image", b, cost=(lambda it: vision[it.key]) if ordered else None))
        warm = engine.prepare(ctx, batches[0])
        engine.generate(warm)  # first call pays one-off costs (allocations, kernels)
        prep = gen_s = 0.0
        pad = total = 0
        for batch in batches:
            t0 = time.perf_counter()
            prepared = engine.prepare(ctx, batch)
            t1 = time.perf_counter()
            results = engine.generate(prepared)
            t2 = time.perf_counter()
            prep += t1 - t0
            gen_s += t2 - t1
            assert len(results) == len(batch) and all(r.completion_tokens == gen.max_new_tokens for r in results)
            mask = prepared.inputs["attention_mask"]
            pad += int((mask == 0).sum())
            total += mask.numel()
        n = len(items)
        return {"gen": n / gen_s, "prep": n / prep, "both": n / (prep + gen_s),
                "tok": n * gen.max_new_tokens / gen_s, "pad": pad / total}

    print("\nthroughput (engine.prepare then engine.generate, no prefetch; images/s):")
    print(f"{'batch':>5} {'order':>9} {'generate':>9} {'prepare':>8} {'both':>7} {'tokens/s':>9} {'padding':>8}")
    rows = [(b, True) for b in sizes]
    if args.unordered_at and args.unordered_at in sizes:
        rows.append((args.unordered_at, False))
    for b, ordered in rows:
        r = timed_pass(b, ordered)
        print(f"{b:>5} {'length' if ordered else 'none':>9} {r['gen']:>9.2f} {r['prep']:>8.2f} {r['both']:>7.2f} "
              f"{r['tok']:>9.1f} {r['pad']:>8.3f}", flush=True)
    print(f"\n{machine_line()}")
    print(f"target: length ordering cuts the padding fraction by at least half at every batch size > 1: "
          f"{'MET' if pad_ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
