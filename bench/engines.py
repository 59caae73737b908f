"""The transformers engine against the vLLM engine on the same images with mixed completion lengths.

    python bench/engines.py                     # tiny head_dim-32 Qwen3-VL on the CPU (vLLM venv)
    python bench/engines.py --checkpoint /models/qwen3-vl --device cuda --images 512 --max-new-tokens 420

Real Stage-A completions range from 4 tokens ("无关图片") to ~420; here a quarter of the images get
4 tokens and the rest are spread evenly up to --max-new-tokens (shuffled with a fixed seed). Each
image's length is forced, so both engines generate exactly the same tokens:

- transformers: static left-padded batches (per_image, ordered by vision tokens, --hf-batch-size);
  a static batch decodes until its longest row is done, so each batch runs with
  min_new_tokens = max_new_tokens = its longest row's length: the same decode steps a real batch
  with early-stopping rows takes. Useful tokens are the rows' own lengths.
- vLLM: one LLM.generate call per pass with every image (what `--batch-size` >= the run's size
  gives), min_tokens = max_tokens = the image's length per request; continuous batching up to
  --max-num-seqs sequences.

Each engine runs in its own process (vLLM's CPU backend pins the process's threads). Per engine:
start-up (model load, vLLM's profiling/compilation), a cold pass over --images images, then a
steady pass over --images other images (distinct files, so neither the prefix cache nor vLLM's
processor cache can reuse an image). Reported per pass: images/s, useful generated tokens/s,
decode-slot utilization (transformers: useful tokens / sum over batches of rows x steps; vLLM:
useful tokens / (engine steps x max_num_seqs), engine steps from vLLM's own counters) and the
prefix-cache hit rate (prompt tokens served from cache / prompt tokens). "whole run" = start-up
+ cold pass, what one fresh process costs.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MISSION, cache_dir, machine_line, write_tree  # noqa: E402

# Camera photos (mostly 2 MP; portrait, 16:9, a 5 MP, a small one), cut to the bbu 1 MP budget.
SIZES = [(1600, 1200), (1200, 1600), (1920, 1080), (1600, 1200), (2560, 1920), (800, 600), (1280, 960)]


def completion_lengths(n: int, max_new: int, seed: int = 7) -> list[int]:
    """A quarter of 4 tokens, the rest spread evenly over [max_new / 7, max_new], shuffled."""
    short = n // 4
    low = max(5, max_new // 7)
    rest = n - short
    spread = [round(low + (max_new - low) * i / max(1, rest - 1)) for i in range(rest)]
    lengths = [min(4, max_new)] * short + spread
    random.Random(seed).shuffle(lengths)
    return lengths


def make_items(root: Path, n: int) -> list[Any]:
    """2n distinct single-image groups (the first n for the cold pass, the rest for the steady one)."""
    from stage_a.work import ImageKey, WorkItem

    groups = [(f"QC-ENG-{g:05d}", "pass", [SIZES[g % len(SIZES)]]) for g in range(2 * n)]
    write_tree(root, groups, distinct=10**9)
    return [WorkItem(ImageKey(1, g, 1), f"{MISSION}/审核通过/{gid}/{gid}-1.jpg")
            for g, (gid, _, _) in enumerate(groups)]


def run_pass(engine: Any, spec: Any, items: list[Any], batch_size: int) -> tuple[float, int]:
    """Plan, prefetch-prepare and generate ``items`` like the product's runner; (seconds, rows)."""
    from engine.prefetch import Prefetcher
    from engine.scheduler import plan_batches

    ctx = engine.context(1, replace(spec, batch_size=batch_size))
    t0 = time.perf_counter()
    rows = 0
    batches = plan_batches(items, "per_image", batch_size, cost=lambda it: engine.estimate_cost(ctx, it))
    with Prefetcher(lambda b: engine.prepare(ctx, b), batches, 2) as pf:
        for _, prepared, error in pf:
            if error is not None:
                raise error
            results = engine.generate(prepared)
            assert all(r.error is None for r in results), [r.error for r in results if r.error]
            rows += len(results)
    return time.perf_counter() - t0, rows


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One engine: start-up, cold pass, steady pass; figures as a dict (printed as JSON)."""
    from stage_a.config import GenerationParams, RunSpec

    root = Path(tempfile.mkdtemp(prefix="stage-a-bench-engines-"))
    items = make_items(root, args.images)
    lengths = completion_lengths(2 * args.images, args.max_new_tokens)
    by_key = {it.key: n for it, n in zip(items, lengths, strict=True)}
    spec = RunSpec(mission=MISSION, dataset="bbu", reuse="off", input_root=str(root), sharding_mode="per_image",
                   generation=GenerationParams(max_new_tokens=args.max_new_tokens))
    t0 = time.perf_counter()
    engine = build_engine(args, by_key)
    startup = time.perf_counter() - t0
    out: dict[str, Any] = {"engine": args.child, "startup_s": startup}
    batch = args.hf_batch_size if args.child == "transformers" else 2 * args.images
    for name, part in (("cold", items[: args.images]), ("steady", items[args.images:])):
        before = engine.counters()
        seconds, rows = run_pass(engine, spec, part, batch)
        after = engine.counters()
        useful = sum(by_key[it.key] for it in part)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        out[name] = {"seconds": seconds, "images": rows, "tokens": useful,
                     "slot_utilization": useful / delta["slot_steps"] if delta.get("slot_steps") else None,
                     "prefix_hit_rate": (delta["cached_tokens"] / delta["prompt_tokens"]
                                         if delta.get("prompt_tokens") else None)}
    return out


def build_engine(args: argparse.Namespace, lengths: dict[Any, int]) -> Any:
    if args.child == "transformers":
        from engine.loader import load_model
        from engine.transformers_engine import PreparedBatch, TransformersEngine
        from stage_a.checkpoint import Checkpoint

        class FixedLengths(TransformersEngine):
            """Each static batch decodes exactly its longest row's length (what it costs for real)."""

            slot_steps = 0

            def generate(self, batch: PreparedBatch) -> list[Any]:
                n = max(lengths[it.key] for it in batch.items)
                gen = replace(batch.ctx.spec.generation, max_new_tokens=n, min_new_tokens=n)
                batch.ctx = replace(batch.ctx, spec=replace(batch.ctx.spec, generation=gen))
                self.slot_steps += n * len(batch.items)
                return super().generate(batch)

            def counters(self) -> dict[str, float]:
                return {"slot_steps": float(self.slot_steps)}

        return FixedLengths(load_model(Checkpoint.open(args.checkpoint), args.device))

    from dataclasses import replace as replace_settings

    from engine.vllm_engine import VllmEngine, load_vllm_engine
    from stage_a.checkpoint import Checkpoint
    from stage_a.settings import Settings

    class FixedLengthsVllm(VllmEngine):
        """min_tokens = max_tokens = the image's length, per request."""

        def request_params(self, batch: Any) -> Any:
            base = self.sampling_params(batch.ctx)
            params = []
            for it in batch.items:
                p = base.clone()
                p.max_tokens = p.min_tokens = lengths[it.key]
                params.append(p)
            return params

        def counters(self) -> dict[str, float]:
            m = vllm_metrics(self.llm)
            return {"slot_steps": m.get("vllm:iteration_tokens_total", 0.0) * args.max_num_seqs,
                    "prompt_tokens": m.get("vllm:prefix_cache_queries", 0.0),
                    "cached_tokens": m.get("vllm:prefix_cache_hits", 0.0)}

    settings = replace_settings(Settings.from_env(), vllm_max_num_seqs=args.max_num_seqs,
                                vllm_enforce_eager=args.enforce_eager, vllm_max_model_len=args.max_model_len)
    engine = load_vllm_engine(Checkpoint.open(args.checkpoint), args.device, settings, disable_log_stats=False)
    return FixedLengthsVllm(engine.llm, engine.processor, engine.checkpoint, lora=engine.lora)


def vllm_metrics(llm: Any) -> dict[str, float]:
    """vLLM's own counters (needs disable_log_stats=False): a counter's value, a histogram's count.

    ``vllm:iteration_tokens_total`` is a histogram: its count is the number of engine steps;
    ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` count prompt tokens looked up / served.
    """
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "count", getattr(metric, "value", None))
        if isinstance(value, int | float):
            totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
    return totals


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{'engine':<13} {'pass':<10} {'images/s':>9} {'tokens/s':>9} {'slots used':>10} {'prefix hit':>10} "
          f"{'seconds':>8}")
    steady = {}
    for r in results:
        whole_s = r["startup_s"] + r["cold"]["seconds"]
        rows = [("cold", r["cold"]["seconds"], r["cold"]), ("steady", r["steady"]["seconds"], r["steady"]),
                ("whole run", whole_s, r["cold"])]
        for name, seconds, p in rows:
            util = f"{p['slot_utilization']:.0%}" if p["slot_utilization"] is not None else "-"
            hit = f"{p['prefix_hit_rate']:.0%}" if p["prefix_hit_rate"] is not None else "-"
            print(f"{r['engine']:<13} {name:<10} {p['images'] / seconds:>9.2f} {p['tokens'] / seconds:>9.1f} "
                  f"{util:>10} {hit:>10} {seconds:>8.1f}")
        print(f"{r['engine']:<13} start-up {r['startup_s']:.1f} s")
        steady[r["engine"]] = r["steady"]["images"] / r["steady"]["seconds"]
    if len(steady) == 2:
        ratio = steady["vllm"] / steady["transformers"]
        print(f"steady images/s, vllm / transformers: {ratio:.2f}x (target >= 1.8x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the tiny head_dim-32 Qwen3-VL")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=64, help="images per pass (cold and steady)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=8, help="the transformers engine's model batch")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="vLLM's decode slots")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--child", choices=["transformers", "vllm"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.checkpoint is None:
        from engine.tiny_model import cached_tiny_checkpoint

        args.checkpoint = str(cached_tiny_checkpoint(cache_dir() / "models", head_dim=32))
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    print(machine_line())
    lengths = completion_lengths(args.images, args.max_new_tokens)
    print(f"model: {args.checkpoint} on {args.device}; {args.images} images per pass ({len(set(SIZES))} camera "
          f"sizes, bbu 1 MP budget); completion lengths: {lengths.count(4)} x 4 tokens, the rest "
          f"{sorted(lengths)[len(lengths) // 4]}..{max(lengths)} (mean {sum(lengths) / len(lengths):.1f}); "
          f"transformers batch {args.hf_batch_size}, vLLM max_num_seqs {args.max_num_seqs}")
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{engine} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    report(results, args)
    print(machine_line())


if __name__ == "__main__":
    main()
