"""The vLLM engine: continuous batching and prefix caching behind the engine interface.

The step loop, runner, store and exporter drive it exactly like the transformers engine:
`prepare` (CPU thread) decodes the images, applies EXIF and checks sizes, so a corrupt image
fails alone before the model; `generate` hands vLLM every prepared row of the batch in one
`LLM.generate` call (vLLM schedules them continuously, up to `max_num_seqs` at once) and matches
the outputs back by index. The chat text, stop tokens, token decoding and clean-up are the shared
preparation's (engine/preparation.py), so under greedy decoding the JSONL is the transformers engine's.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): a Celery prefork child is
daemonic and may not start the engine-core process vLLM would otherwise fork.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from engine.interface import PreparedBatch, RunContext
from engine.loader import force_left_padding, resolve_device
from engine.policy import generate_rows
from engine.preparation import Preparation, preprocessing_error
from stage_a.checkpoint import Checkpoint
from stage_a.config import RunSpec
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.work import ImageResult, WorkItem

log = logging.getLogger(__name__)


class VllmEngine:
    """One `vllm.LLM` per process; thread-safe `prepare`, single-threaded `generate`."""

    name = "vllm"

    def __init__(self, llm: Any, processor: Any, checkpoint: Checkpoint, lora: bool = False,
                 data_dir: str = "") -> None:
        self.llm = llm
        self.checkpoint = checkpoint
        self.fingerprint = checkpoint.identity
        self.processor = processor
        self.data_dir = data_dir
        self.prep = Preparation(processor, data_dir)
        self._preps = {str(checkpoint.processor): self.prep}
        self.lora = lora
        """vLLM was started with LoRA support: adapters on this base are served per request."""
        self.lora_request: Any = None
        self._lora_ids: dict[str, int] = {}
        self.max_model_len = int(llm.model_config.max_model_len)
        """Longest prompt + completion vLLM serves (STAGE_A_VLLM_MAX_MODEL_LEN, as vLLM applied it)."""
        self.image_pad = self.prep.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self._text_tokens: dict[str, int] = {}

    def use_adapter(self, adapter: Checkpoint | None) -> None:
        """vLLM's per-request LoRA: the adapter's requests name it, the base's name none."""
        if adapter is None:
            self.lora_request, self.fingerprint = None, self.checkpoint.identity
        else:
            from vllm.lora.request import LoRARequest

            if not self.lora:
                raise UserError(f"this vLLM engine was started without LoRA support (STAGE_A_VLLM_LORA=0) "
                                f"and cannot serve adapter {adapter.path}")
            lora_id = self._lora_ids.setdefault(adapter.identity, len(self._lora_ids) + 1)
            self.lora_request = LoRARequest(adapter.identity, lora_id, str(adapter.path))
            self.fingerprint = adapter.identity
        source = str(adapter.processor if adapter is not None else self.checkpoint.processor)
        if source not in self._preps:  # an adapter that ships its own tokenizer and processor configs
            from engine.loader import load_processor

            self._preps[source] = Preparation(load_processor(source), self.data_dir)
        self.prep = self._preps[source]
        self.processor = self.prep.processor
        self._text_tokens = {}

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext:
        return self.prep.context(run_id, spec, verify_inputs)

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int:
        return self.prep.estimate_cost(ctx, item)

    def prompt_length(self, ctx: RunContext, vision_tokens: int) -> int:
        """Tokens of the prompt vLLM builds: the chat text with its image placeholder expanded."""
        n = self._text_tokens.get(ctx.chat_text)
        if n is None:
            ids = self.prep.tokenizer(ctx.chat_text, add_special_tokens=False)["input_ids"]
            n = self._text_tokens[ctx.chat_text] = len(ids) - ids.count(self.image_pad)
        return n + vision_tokens

    # ---- CPU side ---------------------------------------------------------------------------

    def scheduler_stats(self) -> dict[str, float] | None:
        """KV-cache usage (0-1) and sequences running / waiting, read from vLLM's scheduler in this process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0, as loaded here); None when vLLM keeps its engine elsewhere or
        its internals moved (vLLM 0.32-0.33: LLMEngine.engine_core -> InprocClient.engine_core -> scheduler)."""
        try:
            scheduler = self.llm.llm_engine.engine_core.engine_core.scheduler
            running, waiting = scheduler.get_request_counts()
            return {"kv_cache_usage": float(scheduler.get_kv_cache_usage()), "running": float(running),
                    "waiting": float(waiting)}
        except Exception:
            return None

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch[list[Any]]:
        """Decode and check every image; vLLM's own processor resizes it inside `generate`."""
        t0 = time.perf_counter()
        loaded, failed = self.prep.load_rows(ctx, items)
        rows, vision = [], []
        for row in loaded:
            try:
                tokens = self.prep.vision_tokens_for(*row.image.image.size, ctx.spec.max_pixels)
            except ValueError as exc:  # smart_resize refuses it (e.g. an extreme aspect ratio)
                failed.append(ImageResult(key=row.item.key, error=preprocessing_error(row.item, exc)))
                continue
            prompt = self.prompt_length(ctx, tokens)
            if prompt >= self.max_model_len:  # vLLM would refuse it (and with it the whole generate call)
                failed.append(ImageResult(key=row.item.key, error=(
                    f"prompt too long: {prompt} tokens ({tokens} for the image) leave no room for a completion "
                    f"within the vLLM engine's max_model_len of {self.max_model_len}: raise "
                    f"STAGE_A_VLLM_MAX_MODEL_LEN or lower the run's --max-pixels"), vision_tokens=tokens))
                continue
            rows.append(row)
            vision.append(tokens)
        if ctx.verify_inputs and not ctx.verified and rows:
            # The same processor and pixel budget that vLLM applies, for the verification log only.
            self.prep.verify(ctx, rows, self.prep.tensorize(ctx, rows))
        return PreparedBatch(ctx=ctx, items=[r.item for r in rows], inputs=[r.image.image for r in rows] or None,
                             vision_tokens=vision, prompt_tokens=[0] * len(rows),
                             preprocess_ms=(time.perf_counter() - t0) * 1000, failed=failed,
                             files={r.item.key: r.image.facts for r in rows})

    # ---- device side ------------------------------------------------------------------------

    def sampling_params(self, ctx: RunContext) -> Any:
        from vllm import SamplingParams

        gen = ctx.spec.generation
        return SamplingParams(
            temperature=0.0 if gen.greedy else gen.temperature,
            top_p=1.0 if gen.greedy else gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            max_tokens=gen.max_new_tokens,
            min_tokens=gen.min_new_tokens,
            stop_token_ids=list(self.prep.stop_ids),
            detokenize=False,  # decoded by the shared preparation, exactly as the transformers engine decodes
        )

    def request_params(self, batch: PreparedBatch[list[Any]]) -> Any:
        """SamplingParams for the batch: one for all rows, or a list in row order."""
        return self.sampling_params(batch.ctx)

    def generate(self, batch: PreparedBatch[list[Any]]) -> list[ImageResult]:
        """Results for every row of the batch (failed-before-model rows included), in any order."""
        if not batch.items or batch.inputs is None:
            return list(batch.failed)
        params = self.request_params(batch)
        return list(batch.failed) + generate_rows(batch, lambda rows: self._generate(batch, rows, params))

    def _generate(self, batch: PreparedBatch[list[Any]], rows: list[int], params: Any) -> list[ImageResult]:
        assert batch.inputs is not None
        ctx = batch.ctx
        # The run's pixel budget, per request (one engine serves bbu 1 MP and rru 2 MP runs).
        mm_kwargs = {"size": {"longest_edge": ctx.spec.max_pixels, "shortest_edge": self.prep.min_pixels}}
        requests = [{"prompt": ctx.chat_text, "multi_modal_data": {"image": batch.inputs[r]},
                     "mm_processor_kwargs": mm_kwargs} for r in rows]
        row_params = [params[r] for r in rows] if isinstance(params, list) else params
        t0 = time.perf_counter()
        outputs = list(self.llm.generate(requests, row_params, use_tqdm=False, lora_request=self.lora_request))
        if len(outputs) != len(rows):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} requests")
        gen_ms = (time.perf_counter() - t0) * 1000 / len(rows)
        prep_ms = batch.preprocess_ms / len(batch.items)
        return [self._result(batch, r, out, prep_ms, gen_ms, (params[r] if isinstance(params, list) else params))
                for r, out in zip(rows, outputs, strict=True)]

    def _result(self, batch: PreparedBatch[list[Any]], row: int, out: Any, prep_ms: float, gen_ms: float,
                params: Any) -> ImageResult:
        token_ids = list(out.outputs[0].token_ids)
        raw, summary, completion = self.prep.decode(token_ids)
        prompt_ids = out.prompt_token_ids or []
        error = None if summary else "empty summary"
        max_tokens = params.max_tokens
        if out.outputs[0].finish_reason == "length" and max_tokens is not None and len(token_ids) < max_tokens:
            # Stopped by max_model_len, not by --max-new-tokens: a summary cut short is no summary.
            summary = ""
            error = (f"completion cut at {len(token_ids)} of {max_tokens} tokens by the vLLM engine's max_model_len "
                     f"of {self.max_model_len} (prompt {len(prompt_ids)} tokens): raise STAGE_A_VLLM_MAX_MODEL_LEN")
        return ImageResult(
            key=batch.items[row].key, summary=summary or None, raw_text=raw,
            error=error, prompt_tokens=len(prompt_ids), completion_tokens=completion,
            vision_tokens=sum(1 for t in prompt_ids if t == self.image_pad) or batch.vision_tokens[row],
            preprocess_ms=prep_ms, generate_ms=gen_ms,
        )


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks)."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves ``rank`` (at least 8)."""
    return next((r for r in VLLM_LORA_RANKS if r >= max(8, rank)), rank)


def load_vllm_engine(checkpoint: Checkpoint, device: str, settings: Settings, adapter: Checkpoint | None = None,
                     **llm_options: Any) -> VllmEngine:
    """Build the vLLM engine once for this process for the full model ``checkpoint``: bf16 on GPU,
    float32 on CPU, prefix caching on.

    Sized by the STAGE_A_VLLM_* settings; ``llm_options`` go to `vllm.LLM` as they are (benchmarks:
    ``load_format="dummy"``, ``disable_log_stats=False``). With STAGE_A_VLLM_LORA (or an ``adapter`` to
    serve first) vLLM starts with LoRA support, and adapters on this base are served per request.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    dev = resolve_device(device)
    if dev.startswith("cuda:") and dev != "cuda:0":
        raise UserError(f"the vLLM engine serves the first visible GPU; pin it with CUDA_VISIBLE_DEVICES, not {dev}")
    path = checkpoint.path
    if adapter is not None and adapter.lora_rank > settings.vllm_max_lora_rank:
        raise UserError(f"LoRA rank {adapter.lora_rank} exceeds max_lora_rank={settings.vllm_max_lora_rank}: "
                        "raise it or merge the adapter into its base model (peft merge_and_unload) and serve the "
                        "merged folder")

    from transformers import AutoProcessor
    from vllm import LLM

    processor = AutoProcessor.from_pretrained(checkpoint.processor)
    force_left_padding(processor)
    kwargs: dict[str, Any] = dict(
        model=str(checkpoint.base), tokenizer=str(checkpoint.processor),
        dtype="bfloat16" if dev.startswith("cuda") else "float32",
        max_model_len=settings.vllm_max_model_len, max_num_seqs=settings.vllm_max_num_seqs,
        enable_prefix_caching=True, limit_mm_per_prompt={"image": 1, "video": 0},
        enforce_eager=settings.vllm_enforce_eager, seed=0, disable_log_stats=True,
        # Decoding is the run's SamplingParams only: "auto" loads the checkpoint's generation_config.json
        # as defaults (its max_new_tokens as a server-wide cap); "vllm" loads nothing from it.
        generation_config="vllm",
    )
    if dev.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = settings.vllm_gpu_memory_utilization
    else:  # vLLM's CPU backend would reserve a share of the host's RAM instead
        kwargs["kv_cache_memory_bytes"] = int(settings.vllm_cpu_kv_cache_gib * 2**30)
    lora = settings.vllm_lora or adapter is not None
    if lora:
        kwargs.update(enable_lora=True, max_loras=settings.vllm_max_loras,
                      max_lora_rank=vllm_lora_rank(settings.vllm_max_lora_rank))
    kwargs.update(llm_options)
    log.info("starting vLLM on %s (%s, max_model_len %d, max_num_seqs %d%s)", path, kwargs["dtype"],
             kwargs["max_model_len"], kwargs["max_num_seqs"], ", LoRA adapters per request" if lora else "")
    try:
        llm = LLM(**kwargs)
    except (OSError, ValueError) as exc:
        hint = " (to serve a LoRA adapter without vLLM's LoRA support, merge it into its base model)" \
            if adapter is not None else ""
        raise UserError(f"vLLM cannot load checkpoint {path}: {str(exc).splitlines()[0]}{hint}") from None
    return VllmEngine(llm, processor, checkpoint, lora=lora, data_dir=settings.data_dir)
