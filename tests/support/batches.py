"""Measuring planned batches (the tests and bench/ use it; the product never needs it)."""

from __future__ import annotations

from collections.abc import Iterable


def padding_fraction(lengths_per_batch: Iterable[list[int]]) -> float:
    """Pad tokens / all prompt tokens (padded), over batches of row lengths."""
    pad = total = 0
    for lengths in lengths_per_batch:
        if not lengths:
            continue
        width = max(lengths)
        pad += sum(width - n for n in lengths)
        total += width * len(lengths)
    return pad / total if total else 0.0
