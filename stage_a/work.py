"""Typed units of work and their results, as they flow producer -> broker -> worker -> store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class ImageKey(NamedTuple):
    """Identity of one image in one run: the store's primary key. A named tuple: a run's keys are made
    by the million when it is queued (a quarter of the time a frozen dataclass takes)."""

    run_id: int
    group_position: int
    image_index: int  # 1-based, the N of image_N


@dataclass(frozen=True)
class WorkItem:
    key: ImageKey
    rel_path: str
    """Path relative to the run's input root; workers refuse anything that leaves the root."""

    def to_message(self) -> dict[str, Any]:
        """The JSON task payload for one image."""
        return {
            "run_id": self.key.run_id,
            "group_position": self.key.group_position,
            "image_index": self.key.image_index,
            "path": self.rel_path,
        }


@dataclass
class ImageResult:
    """What the engine produced for one image: a summary, or a one-line error."""

    key: ImageKey
    summary: str | None = None
    raw_text: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    vision_tokens: int | None = None
    preprocess_ms: float | None = None
    generate_ms: float | None = None
    reuse_key: str | None = None
    """stage_a.reuse content key of the bytes summarized (generated rows)."""
    stat_key: str | None = None
    """stage_a.reuse stat key of the file, when this result is the first to record that signature."""
    reused_from: int | None = None
    """The run that generated this summary, when it was taken instead of generated."""
    model: str | None = None
    engine: str | None = None
    """What produced a reused summary (None: the model and engine of the batch that records it)."""

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.summary)
