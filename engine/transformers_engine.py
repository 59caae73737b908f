"""The batch engine: prepare a batch on the CPU, generate it left-padded on the device.

`prepare` (image decode, resize, tokenization) is pure CPU work and runs in the prefetching
loader's thread; `generate` is the only step that touches the model. Failures of one image
become that image's error; a broken device raises EngineDeadError.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.images import ImageError, header_size, load_image, resolve_under_root
from engine.loader import LoadedModel
from engine.prompts import build_prompt
from stage_a.cleanup import clean_summary
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import dead_engine_error
from stage_a.missions import get_mission
from stage_a.work import ImageResult, WorkItem

log = logging.getLogger(__name__)
verify_log = logging.getLogger(f"{__name__}.verify_inputs")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def preprocessing_error(item: WorkItem, exc: BaseException) -> str:
    """The one-line reason for an image the processor refused, naming the file like load_image does."""
    name = item.rel_path.rsplit("/", 1)[-1]
    return f"preprocessing failed: {name}: {exc}".splitlines()[0]


@dataclass
class RunContext:
    """What every batch of one run shares: the rendered chat text, pixel budget and decoding."""

    run_id: int
    spec: RunSpec
    chat_text: str
    verify_inputs: bool = False
    verified: bool = False


@dataclass
class PreparedBatch:
    ctx: RunContext
    items: list[WorkItem]  # rows that made it into the tensors, in row order
    inputs: Any  # BatchFeature on CPU, or None when every row failed
    vision_tokens: list[int]
    prompt_tokens: list[int]
    preprocess_ms: float
    failed: list[ImageResult] = field(default_factory=list)  # rows that failed before the model


class RepetitionPenaltyIgnoringPad:
    """HF's repetition penalty, but left-padding tokens don't count as "already seen".

    The pad token (<|endoftext|>) is also a stop token: penalising it only in padded rows
    would make a summary depend on its batch neighbours.
    """

    def __init__(self, penalty: float, pad_lengths: list[int]) -> None:
        self.penalty = penalty
        self.pad_lengths = pad_lengths

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        ids = input_ids
        if any(self.pad_lengths):
            ids = input_ids.clone()
            for row, n in enumerate(self.pad_lengths):
                if n:  # replace pads by a token the row already has: the seen-set is unchanged
                    ids[row, :n] = input_ids[row, n]
        score = torch.gather(scores, 1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)


class Engine(Protocol):
    """What the step loop drives: per-run context, CPU-side prepare, device-side generate.

    `prepare` runs in the prefetch thread and turns per-image problems into failed rows;
    `generate` returns one result per row and raises EngineDeadError when the device is gone.
    """

    name: str
    """Engine kind recorded with every result: transformers or vllm."""
    fingerprint: str
    """Fingerprint of the model it serves (stage_a.fingerprint)."""

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext: ...

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int: ...

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch: ...

    def generate(self, batch: PreparedBatch) -> list[ImageResult]: ...


class BatchEngine:
    """The transformers engine: one loaded model, static left-padded batches.

    Thread-safe `prepare`, single-threaded `generate`.
    """

    name = "transformers"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.fingerprint = loaded.fingerprint
        self.processor = loaded.processor
        tok = self.processor.tokenizer
        self.stop_ids = [i for i in (tok.convert_tokens_to_ids(t) for t in STOP_TOKENS) if i is not None and i >= 0]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[-1]
        ip = self.processor.image_processor
        self.factor = int(ip.patch_size) * int(ip.merge_size)
        self.min_pixels = int((ip.size or {}).get("shortest_edge") or 0) or self.factor * self.factor

    # ---- per run ----------------------------------------------------------------------------

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext:
        mission = get_mission(spec.mission)
        prompt = build_prompt(mission, spec.dataset, spec.prompt_profile)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": prompt.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.user}]},
        ]
        chat_text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return RunContext(run_id=run_id, spec=spec, chat_text=chat_text, verify_inputs=verify_inputs)

    def vision_tokens_for(self, width: int, height: int, max_pixels: int) -> int:
        """Vision tokens an image of this size becomes (the processor's smart_resize)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=max_pixels)
        return (h // self.factor) * (w // self.factor)

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int:
        """Cheap (header-only) vision-token estimate, used to order per_image batches by length."""
        try:
            size = header_size(resolve_under_root(item.rel_path, ctx.spec.input_root))
            return self.vision_tokens_for(*size, ctx.spec.max_pixels) if size else 0
        except (ImageError, ValueError):
            # Unreadable, or refused by smart_resize (an extreme aspect ratio): `prepare` fails
            # that image alone with its reason; planning must never fail the whole run.
            return 0

    # ---- CPU side ---------------------------------------------------------------------------

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch:
        t0 = time.perf_counter()
        good: list[WorkItem] = []
        images = []
        sizes_before = []
        hashes = []
        failed: list[ImageResult] = []
        for item in items:
            try:
                loaded = load_image(resolve_under_root(item.rel_path, ctx.spec.input_root))
            except ImageError as exc:
                failed.append(ImageResult(key=item.key, error=str(exc)))
                continue
            good.append(item)
            images.append(loaded.image)
            sizes_before.append(loaded.size_before)
            hashes.append(loaded.file_sha256)
        inputs = None
        if good:
            try:
                inputs = self._tensorize(ctx, images)
            except Exception:
                # One pathological image must not fail its neighbours: find it row by row.
                keep = []
                for item, img in zip(good, images, strict=True):
                    try:
                        self._tensorize(ctx, [img])
                        keep.append((item, img))
                    except Exception as exc:
                        failed.append(ImageResult(key=item.key, error=preprocessing_error(item, exc)))
                good = [k[0] for k in keep]
                images = [k[1] for k in keep]
                inputs = self._tensorize(ctx, images) if good else None
        vision, prompt_tokens = self._row_counts(inputs)
        ms = (time.perf_counter() - t0) * 1000
        batch = PreparedBatch(ctx=ctx, items=good, inputs=inputs, vision_tokens=vision,
                              prompt_tokens=prompt_tokens, preprocess_ms=ms, failed=failed)
        if ctx.verify_inputs and not ctx.verified and inputs is not None:
            ctx.verified = True
            self._log_verification(batch, sizes_before, hashes)
        return batch

    def _tensorize(self, ctx: RunContext, images: list[Any]) -> Any:
        return self.processor(
            text=[ctx.chat_text] * len(images),
            images=images,
            padding=True,
            # The loader forced the tokenizer to left; reading it here (rather than hard-coding)
            # lets the right-padding regression test prove the invariant test catches the bug.
            padding_side=self.processor.tokenizer.padding_side,
            return_tensors="pt",
            size={"longest_edge": ctx.spec.max_pixels, "shortest_edge": self.min_pixels},
        )

    def _row_counts(self, inputs: Any) -> tuple[list[int], list[int]]:
        if inputs is None:
            return [], []
        merge = int(self.processor.image_processor.merge_size) ** 2
        vision = [int(t * h * w) // merge for t, h, w in inputs["image_grid_thw"].tolist()]
        prompt = [int(x) for x in inputs["attention_mask"].sum(dim=1).tolist()]
        return vision, prompt

    def _log_verification(self, batch: PreparedBatch, sizes_before: list[Any], hashes: list[str]) -> None:
        # Asked for explicitly: shown at any log level (the CLI's default is WARNING), on the farm too.
        if not verify_log.isEnabledFor(logging.INFO):
            verify_log.setLevel(logging.INFO)
        pv = batch.inputs["pixel_values"]
        offset = 0
        for row, item in enumerate(batch.items):
            t, h, w = batch.inputs["image_grid_thw"][row].tolist()
            n = int(t * h * w)
            pixel_hash = hashlib.sha256(pv[offset:offset + n].float().numpy().tobytes()).hexdigest()
            offset += n
            patch = int(self.processor.image_processor.patch_size)
            verify_log.info(
                "verify_inputs %s: file_sha256=%s pixel_sha256=%s size_before=%sx%s size_after=%dx%d "
                "image_grid_thw=(%d, %d, %d) vision_tokens=%d prompt_tokens=%d",
                item.rel_path, hashes[row], pixel_hash, *sizes_before[row], int(w) * patch, int(h) * patch,
                t, h, w, batch.vision_tokens[row], batch.prompt_tokens[row],
            )

    # ---- device side ------------------------------------------------------------------------

    def generate(self, batch: PreparedBatch) -> list[ImageResult]:
        """Results for every row of the batch (failed-before-model rows included), in any order."""
        results = list(batch.failed)
        if batch.inputs is None or not batch.items:
            return results
        return results + self._generate_rows(batch, list(range(len(batch.items))))

    def _generate_rows(self, batch: PreparedBatch, rows: list[int]) -> list[ImageResult]:
        import torch

        inputs = batch.inputs if len(rows) == len(batch.items) else self._subset(batch, rows)
        try:
            texts, completion = self._run_model(inputs, batch.ctx.spec.generation)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(rows) == 1:
                return [ImageResult(key=batch.items[rows[0]].key, error="out of GPU memory on a single image")]
            half = len(rows) // 2
            log.warning("out of GPU memory on %d rows; splitting the batch", len(rows))
            return self._generate_rows(batch, rows[:half]) + self._generate_rows(batch, rows[half:])
        except RuntimeError as exc:
            dead = dead_engine_error(exc)
            if dead is not None:
                raise dead from exc
            raise
        per_row_ms = texts.gen_ms / max(1, len(rows))
        out = []
        for j, row in enumerate(rows):
            raw = texts.texts[j]
            summary = clean_summary(raw)
            out.append(ImageResult(
                key=batch.items[row].key, summary=summary or None, raw_text=raw,
                error=None if summary else "empty summary", prompt_tokens=batch.prompt_tokens[row],
                completion_tokens=completion[j], vision_tokens=batch.vision_tokens[row],
                preprocess_ms=batch.preprocess_ms / max(1, len(batch.items)), generate_ms=per_row_ms,
            ))
        return out

    def _subset(self, batch: PreparedBatch, rows: list[int]) -> Any:
        """Re-pad a subset of rows (used after an OOM split) by re-running the processor."""
        images_grid = batch.inputs["image_grid_thw"]
        pv = batch.inputs["pixel_values"]
        counts = [int(t * h * w) for t, h, w in images_grid.tolist()]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        import torch

        ids, masks = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        lengths = [int(masks[r].sum()) for r in rows]
        width = max(lengths)
        new_ids = torch.full((len(rows), width), self.pad_id, dtype=ids.dtype)
        new_mask = torch.zeros((len(rows), width), dtype=masks.dtype)
        extra = {k: v for k, v in batch.inputs.items() if k == "mm_token_type_ids"}
        new_extra = {k: torch.zeros((len(rows), width), dtype=v.dtype) for k, v in extra.items()}
        for j, r in enumerate(rows):
            n = lengths[j]
            new_ids[j, width - n:] = ids[r, ids.shape[1] - n:]
            new_mask[j, width - n:] = 1
            for k, v in extra.items():
                new_extra[k][j, width - n:] = v[r, v.shape[1] - n:]
        return {
            "input_ids": new_ids, "attention_mask": new_mask, **new_extra,
            "pixel_values": torch.cat([pv[starts[r]:starts[r] + counts[r]] for r in rows]),
            "image_grid_thw": images_grid[rows],
        }

    @dataclass
    class _Texts:
        texts: list[str]
        gen_ms: float

    def _run_model(self, inputs: Any, gen: GenerationParams) -> tuple[_Texts, list[int]]:
        import torch
        from transformers import LogitsProcessorList

        model = self.loaded.model
        device = self.loaded.device
        tensors = {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(self.loaded.dtype)
        mask = tensors["attention_mask"]
        pad_lengths = (mask.shape[1] - mask.sum(dim=1)).tolist()
        processors = LogitsProcessorList()
        if gen.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyIgnoringPad(gen.repetition_penalty, [int(n) for n in pad_lengths]))
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "min_new_tokens": gen.min_new_tokens or None,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "logits_processor": processors,
            "do_sample": not gen.greedy,
        }
        if gen.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**tensors, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        gen_ms = (time.perf_counter() - t0) * 1000
        new_tokens = out[:, tensors["input_ids"].shape[1]:].tolist()
        completion = []
        trimmed = []
        stops = set(self.stop_ids)
        for row in new_tokens:
            n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            completion.append(n)
            trimmed.append([t for t in row[:n] if t not in stops and t != self.pad_id])
        texts = self.processor.tokenizer.batch_decode(
            trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return self._Texts(texts=texts, gen_ms=gen_ms), completion
