"""The one failure policy of both engines, decided by exception type, never by message text.

- A dead engine (torch's AcceleratorError, vLLM's EngineDeadError) stops the process: its work
  goes back to the queue by lease expiry.
- Out of memory splits the rows in halves until they fit; a single image that does not fit fails alone.
- Any other error of several rows retries them one at a time, so one bad row fails alone; a row
  that fails by itself gets the error as its reason. Every row failing is the batch's failure,
  never a dead engine.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from engine.interface import PreparedBatch
from stage_a.errors import EngineDeadError, first_line
from stage_a.work import ImageResult

log = logging.getLogger(__name__)

RunRows = Callable[[list[int]], list[ImageResult]]
"""Generate the given rows (indices into the batch's items) in one model call."""


def dead_engine_error(exc: BaseException) -> EngineDeadError | None:
    """``exc`` as an EngineDeadError when the device or engine can serve nothing more, else None."""
    if isinstance(exc, EngineDeadError):
        return exc
    torch = sys.modules.get("torch")
    vllm_errors = sys.modules.get("vllm.v1.engine.exceptions")
    dead = tuple(t for t in (getattr(torch, "AcceleratorError", None), getattr(vllm_errors, "EngineDeadError", None))
                 if isinstance(t, type))
    if dead and isinstance(exc, dead) and not is_out_of_memory(exc):
        return EngineDeadError(f"device failure: {first_line(exc, typed=True)}")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(oom, type) and isinstance(exc, oom)


def generate_rows(batch: PreparedBatch[Any], run: RunRows) -> list[ImageResult]:
    """Every row of ``batch`` through ``run``, under the policy above."""
    return _attempt(batch, list(range(len(batch.items))), run)


def _attempt(batch: PreparedBatch[Any], rows: list[int], run: RunRows) -> list[ImageResult]:
    try:
        return run(rows)
    except Exception as exc:
        dead = dead_engine_error(exc)
        if dead is not None:
            raise dead from exc
        if is_out_of_memory(exc):
            _free_device_memory()
            if len(rows) == 1:
                return [ImageResult(key=batch.items[rows[0]].key, error="out of GPU memory on a single image")]
            log.warning("out of memory on %d rows; splitting the batch", len(rows))
            half = len(rows) // 2
            return _attempt(batch, rows[:half], run) + _attempt(batch, rows[half:], run)
        if len(rows) == 1:
            return [ImageResult(key=batch.items[rows[0]].key, error=f"generation failed: {first_line(exc, typed=True)}")]
        log.warning("generation failed on %d rows (%s); retrying them one at a time", len(rows), first_line(exc, typed=True))
        return [result for row in rows for result in _attempt(batch, [row], run)]


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
