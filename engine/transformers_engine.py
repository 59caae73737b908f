"""The transformers engine: static left-padded batches through `model.generate`."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from engine.interface import PreparedBatch, RunContext
from engine.loader import LoadedModel
from engine.policy import generate_rows
from engine.preparation import Preparation, Row, preprocessing_error
from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.work import ImageResult, WorkItem


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


class TransformersEngine:
    """One loaded model; thread-safe `prepare`, single-threaded `generate`."""

    name = "transformers"

    def __init__(self, loaded: LoadedModel, data_dir: str = "") -> None:
        self.loaded = loaded
        self.fingerprint = loaded.fingerprint
        self.base_fingerprint = loaded.fingerprint
        self.processor = loaded.processor
        self.data_dir = data_dir
        self.prep = Preparation(loaded.processor, data_dir)
        self._preps = {str(loaded.processor_source): self.prep}
        self.pad_id = self.prep.pad_id
        self.adapter: str | None = None
        """The active peft adapter's name (its identity), None: the base model."""

    def use_adapter(self, adapter: Checkpoint | None) -> None:
        """peft adapters side by side on the base model (unmerged: a merge could not be undone exactly)."""
        from peft import PeftModel

        model = self.loaded.model
        if adapter is None:
            self.adapter, self.fingerprint = None, self.base_fingerprint
        else:
            name = adapter.identity
            if not isinstance(model, PeftModel):
                model = self.loaded.model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name)
                model.eval()
            elif name not in model.peft_config:
                model.load_adapter(str(adapter.path), adapter_name=name)
            model.set_adapter(name)
            self.adapter, self.fingerprint = name, adapter.identity
        source = str(adapter.processor if adapter is not None else self.loaded.processor_source)
        if source not in self._preps:  # an adapter that ships its own tokenizer and processor configs
            from engine.loader import load_processor

            self._preps[source] = Preparation(load_processor(source), self.data_dir)
        self.prep = self._preps[source]
        self.processor = self.prep.processor
        self.pad_id = self.prep.pad_id

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext:
        return self.prep.context(run_id, spec, verify_inputs)

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int:
        return self.prep.estimate_cost(ctx, item)

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch[Any]:
        """Decode, resize and tokenize on the CPU; an image the processor refuses fails alone."""
        t0 = time.perf_counter()
        rows, failed = self.prep.load_rows(ctx, items)
        inputs = None
        if rows:
            try:
                inputs = self.prep.tensorize(ctx, rows)
            except Exception:
                # One pathological image must not fail its neighbours: find it row by row.
                keep: list[Row] = []
                for row in rows:
                    try:
                        self.prep.tensorize(ctx, [row])
                        keep.append(row)
                    except Exception as exc:
                        failed.append(ImageResult(key=row.item.key, error=preprocessing_error(row.item, exc)))
                rows = keep
                inputs = self.prep.tensorize(ctx, rows) if rows else None
        vision, prompt_tokens = self.prep.row_counts(inputs)
        if inputs is not None:
            self.prep.verify(ctx, rows, inputs)
        return PreparedBatch(ctx=ctx, items=[r.item for r in rows], inputs=inputs, vision_tokens=vision,
                             prompt_tokens=prompt_tokens, preprocess_ms=(time.perf_counter() - t0) * 1000,
                             failed=failed, files={r.item.key: r.image.facts for r in rows})

    def generate(self, batch: PreparedBatch[Any]) -> list[ImageResult]:
        """Results for every row of the batch (failed-before-model rows included), in any order."""
        if batch.inputs is None or not batch.items:
            return list(batch.failed)
        return list(batch.failed) + generate_rows(batch, lambda rows: self._generate(batch, rows))

    def _generate(self, batch: PreparedBatch[Any], rows: list[int]) -> list[ImageResult]:
        inputs = batch.inputs if len(rows) == len(batch.items) else self._subset(batch, rows)
        t0 = time.perf_counter()
        completions = self._run_model(inputs, batch.ctx.spec.generation)
        per_row_ms = (time.perf_counter() - t0) * 1000 / len(rows)
        out = []
        for row, tokens in zip(rows, completions, strict=True):
            raw, summary, completion = self.prep.decode(tokens)
            out.append(ImageResult(
                key=batch.items[row].key, summary=summary or None, raw_text=raw,
                error=None if summary else "empty summary", prompt_tokens=batch.prompt_tokens[row],
                completion_tokens=completion, vision_tokens=batch.vision_tokens[row],
                preprocess_ms=batch.preprocess_ms / len(batch.items), generate_ms=per_row_ms,
            ))
        return out

    def _subset(self, batch: PreparedBatch[Any], rows: list[int]) -> Any:
        """Re-pad a subset of rows (after an out-of-memory split) from the batch's tensors."""
        import torch

        assert batch.inputs is not None
        images_grid = batch.inputs["image_grid_thw"]
        pv = batch.inputs["pixel_values"]
        counts = [int(t * h * w) for t, h, w in images_grid.tolist()]
        starts = [sum(counts[:i]) for i in range(len(counts))]
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

    def _run_model(self, inputs: Any, gen: GenerationParams) -> list[list[int]]:
        """The generated token ids of each row (after the prompt)."""
        import torch
        from transformers import LogitsProcessorList

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
            "eos_token_id": self.prep.stop_ids,
            "pad_token_id": self.pad_id,
            "logits_processor": processors,
            "do_sample": not gen.greedy,
        }
        if gen.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=None)
        model = self.loaded.model
        base_only = self.adapter is None and hasattr(model, "disable_adapter")  # a PeftModel serving its base
        with torch.inference_mode(), (model.disable_adapter() if base_only else nullcontext()):
            out = model.generate(**tensors, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return [list(row) for row in out[:, tensors["input_ids"].shape[1]:].tolist()]
