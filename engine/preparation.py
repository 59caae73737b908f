"""The parts both engines share: the chat text, per-row image loading, the cost estimate, the
processor's tensors (the transformers engine's inputs, both engines' input verification log) and
decoding a completion into a summary.

One processor (Qwen3-VL's, tokenizer forced to left padding) and one set of stop tokens serve
both engines, so under greedy decoding they write the same summaries.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.images import ImageError, LoadedImage, header_size, load_image, resolve_under_root
from engine.interface import RunContext
from engine.prompts import build_prompt
from stage_a.cleanup import clean_summary
from stage_a.config import RunSpec
from stage_a.missions import get_mission
from stage_a.work import ImageResult, WorkItem

verify_log = logging.getLogger("engine.verify_inputs")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Row:
    """One image of a batch, decoded."""

    item: WorkItem
    image: LoadedImage


def preprocessing_error(item: WorkItem, exc: BaseException) -> str:
    """The one-line reason for an image the processor refused, naming the file like load_image does."""
    name = item.rel_path.rsplit("/", 1)[-1]
    return f"preprocessing failed: {name}: {exc}".splitlines()[0]


class Preparation:
    """Thread-safe CPU work around one processor (the prefetch thread runs it)."""

    def __init__(self, processor: Any, data_dir: str = "") -> None:
        self.processor = processor
        self.data_dir = data_dir
        """Mission and prompt data overriding the packaged one (STAGE_A_DATA_DIR); empty: packaged."""
        self.tokenizer = processor.tokenizer
        tok = self.tokenizer
        self.stop_ids = [i for i in (tok.convert_tokens_to_ids(t) for t in STOP_TOKENS) if i is not None and i >= 0]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[-1]
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.factor = self.patch * self.merge
        self.min_pixels = int((ip.size or {}).get("shortest_edge") or 0) or self.factor * self.factor

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext:
        mission = get_mission(spec.mission, data_dir=self.data_dir)
        prompt = build_prompt(mission, spec.dataset, spec.prompt_profile, data_dir=self.data_dir)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": prompt.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.user}]},
        ]
        chat_text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return RunContext(run_id=run_id, spec=spec, chat_text=chat_text, verify_inputs=verify_inputs)

    def vision_tokens_for(self, width: int, height: int, max_pixels: int) -> int:
        """Vision tokens an image of this size becomes (the processor's smart_resize); ValueError if refused."""
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
            # that image alone with its reason; planning never fails the whole run.
            return 0

    def load_rows(self, ctx: RunContext, items: Sequence[WorkItem]) -> tuple[list[Row], list[ImageResult]]:
        """Decode every image under the run's input root: (rows that loaded, failed rows with the reason)."""
        rows: list[Row] = []
        failed: list[ImageResult] = []
        for item in items:
            try:
                rows.append(Row(item, load_image(resolve_under_root(item.rel_path, ctx.spec.input_root))))
            except ImageError as exc:
                failed.append(ImageResult(key=item.key, error=str(exc)))
        return rows, failed

    def tensorize(self, ctx: RunContext, rows: Sequence[Row]) -> Any:
        """The processor's left-padded tensors (a BatchFeature on the CPU) for ``rows``."""
        return self.processor(
            text=[ctx.chat_text] * len(rows),
            images=[r.image.image for r in rows],
            padding=True,
            # The loader forces the tokenizer to left; reading it here (rather than hard-coding)
            # lets the right-padding regression test prove the invariant test catches the bug.
            padding_side=self.tokenizer.padding_side,
            return_tensors="pt",
            size={"longest_edge": ctx.spec.max_pixels, "shortest_edge": self.min_pixels},
        )

    def row_counts(self, inputs: Any) -> tuple[list[int], list[int]]:
        """(vision tokens, prompt tokens) of each row of the processor's tensors."""
        if inputs is None:
            return [], []
        vision = [int(t * h * w) // self.merge ** 2 for t, h, w in inputs["image_grid_thw"].tolist()]
        prompt = [int(x) for x in inputs["attention_mask"].sum(dim=1).tolist()]
        return vision, prompt

    def verify(self, ctx: RunContext, rows: Sequence[Row], inputs: Any) -> None:
        """Log, once per run, what the first batch's images became (hashes, sizes, grid, token counts)."""
        if not ctx.verify_inputs or ctx.verified or not rows:
            return
        ctx.verified = True
        # Asked for explicitly: shown at any log level (the CLI's default is WARNING), on the farm too.
        if not verify_log.isEnabledFor(logging.INFO):
            verify_log.setLevel(logging.INFO)
        vision, prompt = self.row_counts(inputs)
        pv = inputs["pixel_values"]
        offset = 0
        for i, row in enumerate(rows):
            t, h, w = inputs["image_grid_thw"][i].tolist()
            n = int(t * h * w)
            pixel_hash = hashlib.sha256(pv[offset:offset + n].float().numpy().tobytes()).hexdigest()
            offset += n
            verify_log.info(
                "verify_inputs %s: file_sha256=%s pixel_sha256=%s size_before=%sx%s size_after=%dx%d "
                "image_grid_thw=(%d, %d, %d) vision_tokens=%d prompt_tokens=%d",
                row.item.rel_path, row.image.file_sha256, pixel_hash, *row.image.size_before,
                int(w) * self.patch, int(h) * self.patch, t, h, w, vision[i], prompt[i],
            )

    def decode(self, token_ids: Sequence[int]) -> tuple[str, str, int]:
        """(raw text, cleaned summary, completion tokens up to and including the first stop token)."""
        stops = set(self.stop_ids)
        end = next((i + 1 for i, t in enumerate(token_ids) if t in stops), len(token_ids))
        kept = [t for t in token_ids[:end] if t not in stops and t != self.pad_id]
        raw = self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return raw, clean_summary(raw), end
