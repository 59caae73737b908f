"""Failure reason classes: a small fixed set derived from an image's stored error text.

Metrics label failures by class (never by the free-form text, whose values are unbounded) and
status, its JSON, the run page and the end-of-run report count them by the same classes. The
texts matched here are the ones engine/, workers/ and stage_a/paths.py write; a new kind of error
falls into ``other`` until a rule names it.
"""

from __future__ import annotations

UNREADABLE_IMAGE = "unreadable_image"
TOO_LARGE = "too_large"
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_SUMMARY = "empty_summary"
OUT_OF_MEMORY = "out_of_memory"
ENGINE_ERROR = "engine_error"
OUTSIDE_ROOT = "outside_root"
GAVE_UP = "gave_up"
OTHER = "other"

FAILURE_CLASSES: tuple[str, ...] = (
    UNREADABLE_IMAGE, TOO_LARGE, PROMPT_TOO_LONG, EMPTY_SUMMARY, OUT_OF_MEMORY, ENGINE_ERROR,
    OUTSIDE_ROOT, GAVE_UP, OTHER,
)
"""Every class ``failure_class`` returns, in the order reports list them."""

# First match wins, so the more specific prefixes come first ("image too large" before any
# "preprocessing failed" that would otherwise read as an engine error).
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (GAVE_UP, ("gave up after",)),
    (OUTSIDE_ROOT, ("is outside stage_a_input_roots", "path leaves the input root", "absolute path not allowed",
                    "invalid image path", "empty image path")),
    (OUT_OF_MEMORY, ("out of gpu memory", "outofmemoryerror", "out of memory")),
    (TOO_LARGE, ("file too large", "image too large", "decompression bomb")),
    (PROMPT_TOO_LONG, ("prompt too long",)),
    (EMPTY_SUMMARY, ("empty summary",)),
    (UNREADABLE_IMAGE, ("cannot read ", "not a regular file", "empty file", "not an image file", "corrupt image",
                        "preprocessing failed")),
    (ENGINE_ERROR, ("generation failed", "preparing the batch failed")),
)


def failure_class(error: str | None) -> str:
    """The class of a stored failure text (one of FAILURE_CLASSES); ``other`` when no rule matches."""
    text = (error or "").lower()
    for name, needles in _RULES:
        if any(n in text for n in needles):
            return name
    return OTHER
