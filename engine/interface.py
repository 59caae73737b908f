"""What the step loop drives: the engine interface, per-run contexts and typed prepared batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from engine.images import FileFacts
from stage_a.checkpoint import Checkpoint
from stage_a.config import RunSpec
from stage_a.work import ImageKey, ImageResult, WorkItem

InputsT = TypeVar("InputsT")


@dataclass
class RunContext:
    """What every batch of one run shares: the rendered chat text, pixel budget and decoding."""

    run_id: int
    spec: RunSpec
    chat_text: str
    verify_inputs: bool = False
    verified: bool = False


@dataclass
class PreparedBatch(Generic[InputsT]):
    """A batch after the CPU work: its rows' model inputs, and the rows that failed before the model."""

    ctx: RunContext
    items: list[WorkItem]
    """Rows that made it into ``inputs``, in row order."""
    inputs: InputsT | None
    """The engine's own model inputs for ``items`` (None when every row failed)."""
    vision_tokens: list[int]
    prompt_tokens: list[int]
    preprocess_ms: float
    failed: list[ImageResult] = field(default_factory=list)
    files: dict[ImageKey, FileFacts] = field(default_factory=dict)
    """What identifies the bytes each row decoded (the step loop keys its summary by them)."""


class Engine(Protocol):
    """Per-run context, CPU-side `prepare` (the prefetch thread, per-image problems become failed
    rows), device-side `generate` (one result per row; engine.policy decides what a failure means)."""

    name: str
    """Engine kind recorded with every result: transformers or vllm."""
    fingerprint: str
    """Identity of the model it serves now (stage_a.checkpoint): the base's, or the active adapter's."""

    def use_adapter(self, adapter: Checkpoint | None) -> None:
        """Serve ``adapter`` (a LoRA folder on this engine's base model) from now on, or the base itself
        (None). Adapters stay loaded side by side: switching runs between them reloads nothing."""
        ...

    def context(self, run_id: int, spec: RunSpec, verify_inputs: bool = False) -> RunContext: ...

    def estimate_cost(self, ctx: RunContext, item: WorkItem) -> int: ...

    def prepare(self, ctx: RunContext, items: list[WorkItem]) -> PreparedBatch[Any]: ...

    def generate(self, batch: PreparedBatch[Any]) -> list[ImageResult]: ...
