"""The vLLM engine: continuous batching and prefix caching behind BatchEngine's interface.

The step loop, runner, store and exporter drive it exactly like the transformers engine:
`prepare` (CPU thread) decodes the images, applies EXIF and checks sizes, so a corrupt image
fails alone before the model; `generate` hands vLLM every prepared row of the batch in one
`LLM.generate` call (vLLM schedules them continuously, up to `max_num_seqs` at once) and matches
the outputs back by index. The rendered chat text, the stop tokens, the clean-up and the token
decoding are BatchEngine's own, so under greedy decoding the JSONL is the transformers engine's.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): a Celery prefork child is
daemonic and may not start the engine-core process vLLM would otherwise fork.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.images import ImageError, load_image, resolve_under_root
from engine.loader import LoadedModel, force_left_padding, resolve_device
from engine.transformers_engine import BatchEngine, PreparedBatch, RunContext, preprocessing_error
from stage_a.cleanup import clean_summary
from stage_a.errors import EngineDeadError, UserError
from stage_a.fingerprint import check_checkpoint, model_fingerprint
from stage_a.settings import Settings
from stage_a.work import ImageResult, WorkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSettings:
    """How the vLLM engine is sized; every field has a default that fits one GPU or this CPU."""

    max_model_len: int = 8192
    """Longest prompt + completion (tokens). A 2 MP image is ~2,150 vision tokens, the prompt ~1,100,
    the completion up to max_new_tokens (1024): 8192 leaves room; lower it to fit more sequences."""
    gpu_memory_utilization: float = 0.90
    """Fraction of the GPU's memory vLLM may take (weights + activations + KV cache). GPU only."""
    max_num_seqs: int = 128
    """Sequences decoded together at most (vLLM's continuous batch). More rows in one generate call
    wait in vLLM's queue and start as running ones finish."""
    cpu_kv_cache_gib: float = 1.0
    """CPU only: KV cache size. (On the CPU backend gpu_memory_utilization would reserve that
    fraction of the host's RAM, 92% by default, and refuse to start on a busy machine.)"""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile (faster start, slower steps)."""
    max_lora_rank: int = 64
    """Largest LoRA rank served when the checkpoint is an adapter folder."""
    load_format: str = "auto"
    """vLLM's weight loading; "dummy" builds random weights from config.json (benchmarks)."""
    log_stats: bool = False
    """Keep vLLM's metrics (LLM.get_metrics: engine steps, generation tokens); benchmarks turn it on."""

    def __post_init__(self) -> None:
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")


def vllm_settings(s: Settings) -> VllmSettings:
    """The STAGE_A_VLLM_* fields of the process settings as the engine's sizing."""
    return VllmSettings(**{f.name: getattr(s, f"vllm_{f.name}") for f in fields(VllmSettings)
                           if hasattr(s, f"vllm_{f.name}")})


@dataclass
class CacheStats:
    """Prompt tokens seen and served from the prefix cache since the engine started."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class VllmEngine(BatchEngine):
    """One `vllm.LLM` per process; thread-safe `prepare`, single-threaded `generate`.

    BatchEngine supplies the per-run context (chat text), the cost estimate used to order
    per_image batches and the input verification log; only preparing and generating differ.
    """

    name = "vllm"

    def __init__(self, loaded: LoadedModel, lora_request: Any = None) -> None:
        super().__init__(loaded)
        self.llm = loaded.model
        self.lora_request = lora_request
        self.stats = CacheStats()
        self.max_model_len = int(self.llm.model_config.max_model_len)
        """Longest prompt + completion vLLM serves (STAGE_A_VLLM_MAX_MODEL_LEN, as vLLM applied it)."""
        self._text_tokens: dict[str, int] = {}

    def prompt_length(self, ctx: RunContext, vision_tokens: int) -> int:
        """Tokens of the prompt vLLM builds: the chat text with its image placeholder expanded."""
        n = self._text_tokens.get(ctx.chat_text)
        if n is None:
            tok = self.processor.tokenizer
            ids = tok(ctx.chat_text, add_special_tokens=False)["input_ids"]
            pad = tok.convert_tokens_to_ids("<|image_pad|>")
            n = self._text_tokens[ctx.chat_text] = len(ids) - ids.count(pad)
        return n + vision_tokens

    # ---- CPU side ---------------------------------------------------------------------------

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch:
        """Decode and check every image; vLLM's own processor resizes it inside `generate`."""
        t0 = time.perf_counter()
        good: list[WorkItem] = []
        images: list[Any] = []
        vision: list[int] = []
        failed: list[ImageResult] = []
        for item in items:
            try:
                loaded = load_image(resolve_under_root(item.rel_path, ctx.spec.input_root))
                tokens = self.vision_tokens_for(*loaded.image.size, ctx.spec.max_pixels)
            except ImageError as exc:
                failed.append(ImageResult(key=item.key, error=str(exc)))
                continue
            except ValueError as exc:  # smart_resize refuses it (e.g. an extreme aspect ratio)
                failed.append(ImageResult(key=item.key, error=preprocessing_error(item, exc)))
                continue
            prompt = self.prompt_length(ctx, tokens)
            if prompt >= self.max_model_len:  # vLLM would refuse it (and with it the whole generate call)
                failed.append(ImageResult(key=item.key, error=(
                    f"prompt too long: {prompt} tokens ({tokens} for the image) leave no room for a completion "
                    f"within the vLLM engine's max_model_len of {self.max_model_len}: raise "
                    f"STAGE_A_VLLM_MAX_MODEL_LEN or lower the run's --max-pixels"), vision_tokens=tokens))
                continue
            good.append(item)
            images.append(loaded.image)
            vision.append(tokens)
        batch = PreparedBatch(ctx=ctx, items=good, inputs=images or None, vision_tokens=vision,
                              prompt_tokens=[0] * len(good), preprocess_ms=(time.perf_counter() - t0) * 1000,
                              failed=failed)
        if ctx.verify_inputs and not ctx.verified and good:
            # The transformers engine's verification log (hashes, sizes, grid, token counts), from
            # the same processor and pixel budget that vLLM applies; it marks ctx verified.
            BatchEngine.prepare(self, ctx, good)
        return batch

    # ---- device side ------------------------------------------------------------------------

    def mm_processor_kwargs(self, ctx: RunContext) -> dict[str, Any]:
        """The run's pixel budget, per request (one engine serves bbu 1 MP and rru 2 MP runs)."""
        return {"size": {"longest_edge": ctx.spec.max_pixels, "shortest_edge": self.min_pixels}}

    def sampling_params(self, ctx: RunContext) -> Any:
        from vllm import SamplingParams

        gen = ctx.spec.generation
        return SamplingParams(
            temperature=0.0 if gen.greedy else gen.temperature,
            top_p=1.0 if gen.greedy else gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            max_tokens=gen.max_new_tokens,
            min_tokens=gen.min_new_tokens,
            stop_token_ids=list(self.stop_ids),
            detokenize=False,  # decoded below exactly as the transformers engine decodes
        )

    def request_params(self, batch: PreparedBatch) -> Any:
        """SamplingParams for the batch: one for all rows, or a list in row order (benchmarks)."""
        return self.sampling_params(batch.ctx)

    def generate(self, batch: PreparedBatch) -> list[ImageResult]:
        """Results for every row of the batch (failed-before-model rows included), in any order."""
        results = list(batch.failed)
        if not batch.items:
            return results
        ctx = batch.ctx
        params = self.request_params(batch)
        mm_kwargs = self.mm_processor_kwargs(ctx)
        requests = [{"prompt": ctx.chat_text, "multi_modal_data": {"image": image}, "mm_processor_kwargs": mm_kwargs}
                    for image in batch.inputs]
        t0 = time.perf_counter()
        try:
            outputs: list[Any] = self._run(requests, params)
        except EngineDeadError:
            raise
        except Exception as exc:
            if len(requests) == 1:
                raise
            log.warning("vLLM failed on a batch of %d (%s); retrying row by row", len(requests),
                        str(exc).splitlines()[0] if str(exc) else repr(exc))
            outputs = self._run_rows(requests, params)
        gen_ms = (time.perf_counter() - t0) * 1000
        if len(outputs) != len(batch.items):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(batch.items)} requests")
        per_row_ms = gen_ms / len(batch.items)
        per_row_prep = batch.preprocess_ms / len(batch.items)
        for row, out in enumerate(outputs):
            if isinstance(out, Exception):
                error = f"generation failed: {str(out).splitlines()[0] if str(out) else repr(out)}"
                results.append(ImageResult(key=batch.items[row].key, error=error))
            else:
                max_tokens = (params[row] if isinstance(params, list) else params).max_tokens
                results.append(self._result(batch, row, out, per_row_prep, per_row_ms, max_tokens))
        return results

    def _run_rows(self, requests: list[dict[str, Any]], params: Any) -> list[Any]:
        """One request at a time: a failing row becomes its exception. Every row failing is a dead
        engine, unless some of them were refused by vLLM for their input (too long, a bad image):
        those are the rows' own errors, and a batch of only such rows says nothing about the engine."""
        try:  # vLLM's refusal of a request's input; not every vLLM release has this type
            from vllm.exceptions import VLLMClientError as refused_input
        except ImportError:
            refused_input = ValueError

        outputs: list[Any] = []
        for i, request in enumerate(requests):
            row_params = params[i] if isinstance(params, list) else params
            try:
                outputs.extend(self._run([request], row_params))
            except EngineDeadError:
                raise
            except Exception as exc:
                outputs.append(exc)
        refused = (ValueError, refused_input)
        if all(isinstance(o, Exception) and not isinstance(o, refused) for o in outputs):
            raise EngineDeadError(f"vLLM fails on every request: {outputs[0]}")
        return outputs

    def _run(self, requests: list[dict[str, Any]], params: Any) -> list[Any]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        try:
            return list(self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request))
        except VllmDeadError as exc:
            raise EngineDeadError(f"vLLM engine dead: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        except RuntimeError as exc:
            text = str(exc)
            if "CUDA" in text or "cuda" in text or "out of memory" in text:
                raise EngineDeadError(f"device failure: {text.splitlines()[0]}") from exc
            raise

    def _result(self, batch: PreparedBatch, row: int, out: Any, prep_ms: float, gen_ms: float,
                max_tokens: int | None = None) -> ImageResult:
        token_ids = list(out.outputs[0].token_ids)
        stops = set(self.stop_ids)
        end = next((i + 1 for i, t in enumerate(token_ids) if t in stops), len(token_ids))
        kept = [t for t in token_ids[:end] if t not in stops and t != self.pad_id]
        raw = self.processor.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        summary = clean_summary(raw)
        prompt_ids = out.prompt_token_ids or []
        image_pad = self.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        vision = sum(1 for t in prompt_ids if t == image_pad) or batch.vision_tokens[row]
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt_ids)
        self.stats.cached_tokens += int(out.num_cached_tokens or 0)
        self.stats.completion_tokens += end
        error = None if summary else "empty summary"
        if out.outputs[0].finish_reason == "length" and max_tokens is not None and len(token_ids) < max_tokens:
            # Stopped by max_model_len, not by --max-new-tokens: a summary cut short is no summary.
            summary = ""
            error = (f"completion cut at {len(token_ids)} of {max_tokens} tokens by the vLLM engine's max_model_len "
                     f"of {self.max_model_len} (prompt {len(prompt_ids)} tokens): raise STAGE_A_VLLM_MAX_MODEL_LEN")
        return ImageResult(
            key=batch.items[row].key, summary=summary or None, raw_text=raw,
            error=error, prompt_tokens=len(prompt_ids), completion_tokens=end,
            vision_tokens=vision, preprocess_ms=prep_ms, generate_ms=gen_ms,
        )

    def prefix_cache_stats(self) -> CacheStats:
        """Cumulative prefix-cache figures of this engine (hit_rate = cached / prompt tokens)."""
        return CacheStats(**vars(self.stats))

    def metrics(self) -> dict[str, float]:
        """vLLM's own counters (needs log_stats=True): a counter's value, a histogram's count.

        E.g. ``vllm:iteration_tokens_total`` (a histogram: its count is the number of engine steps),
        ``vllm:generation_tokens``, ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``.
        """
        totals: dict[str, float] = {}
        for metric in self.llm.get_metrics():
            value = getattr(metric, "count", getattr(metric, "value", None))
            if isinstance(value, int | float):
                totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
        return totals


def _adapter_base(path: Path) -> tuple[Path, int] | None:
    """(base model folder, LoRA rank) for an adapter folder, None for a merged model folder.

    The rank is the largest of any module: peft's rank_pattern may raise some above ``r``."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file() or (path / "config.json").is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    base = Path(cfg.get("base_model_name_or_path") or "").expanduser()
    if not base.is_absolute() and not base.is_dir():
        base = (path / base).resolve()
    if not base.is_dir():
        raise UserError(f"LoRA base model folder not found: {base} (from {cfg_path})")
    ranks = [int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return base, max(ranks)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks)."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves ``rank`` (at least 8)."""
    return next((r for r in VLLM_LORA_RANKS if r >= max(8, rank)), rank)


def load_vllm_engine(checkpoint: str | Path, device: str = "auto", **settings: Any) -> VllmEngine:
    """Build the vLLM engine once for this process: bf16 on GPU, float32 on CPU, prefix caching on.

    ``settings`` are VllmSettings fields (max_model_len, gpu_memory_utilization, max_num_seqs, ...);
    fields not given come from STAGE_A_VLLM_* variables (VllmSettings.from_env), else the defaults.
    A LoRA adapter folder is served through vLLM's LoRA support on its base model.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = replace(vllm_settings(Settings.from_env()), **settings)
    path = check_checkpoint(checkpoint)
    dev = resolve_device(device)
    if dev.startswith("cuda:") and dev != "cuda:0":
        raise UserError(f"the vLLM engine serves the first visible GPU; pin it with CUDA_VISIBLE_DEVICES, not {dev}")
    adapter = _adapter_base(path)
    base = adapter[0] if adapter else path

    import torch
    from transformers import AutoProcessor
    from vllm import LLM

    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    processor_src = path if (path / "tokenizer_config.json").is_file() else base
    processor = AutoProcessor.from_pretrained(processor_src)
    force_left_padding(processor)
    kwargs: dict[str, Any] = dict(
        model=str(base), tokenizer=str(processor_src), dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=True,
        limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=cfg.enforce_eager, seed=0,
        disable_log_stats=not cfg.log_stats, load_format=cfg.load_format,
        # Decoding is the run's SamplingParams only: "auto" loads the checkpoint's generation_config.json
        # as defaults (its max_new_tokens as a server-wide cap); "vllm" loads nothing from it.
        generation_config="vllm",
    )
    if dev.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * 2**30)
    lora_request = None
    if adapter:
        from vllm.lora.request import LoRARequest

        rank = adapter[1]
        if rank > cfg.max_lora_rank:
            raise UserError(f"LoRA rank {rank} exceeds max_lora_rank={cfg.max_lora_rank}: raise it or merge the "
                            f"adapter into its base model (peft merge_and_unload) and serve the merged folder")
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(rank))
        lora_request = LoRARequest("stage-a-adapter", 1, str(path))
    log.info("starting vLLM on %s%s (%s, max_model_len %d, max_num_seqs %d)", "LoRA adapter " if adapter else "",
             path, kwargs["dtype"], cfg.max_model_len, cfg.max_num_seqs)
    try:
        llm = LLM(**kwargs)
    except (OSError, ValueError) as exc:
        hint = " (to serve a LoRA adapter without vLLM's LoRA support, merge it into its base model)" if adapter else ""
        raise UserError(f"vLLM cannot load checkpoint {path}: {str(exc).splitlines()[0]}{hint}") from None
    loaded = LoadedModel(model=llm, processor=processor, device=torch.device(dev), dtype=dtype,
                         checkpoint=str(path), adapter=adapter is not None, attn_implementation="vllm",
                         fingerprint=model_fingerprint(path))
    return VllmEngine(loaded, lora_request=lora_request)
