"""Failure reason classes: every error text the code writes falls in its class, unknown text in ``other``."""

from __future__ import annotations

import pytest

from stage_a.failures import FAILURE_CLASSES, failure_class


@pytest.mark.parametrize(("error", "expected"), [
    ("cannot read a.jpg: Permission denied", "unreadable_image"),
    ("not an image file: a.jpg", "unreadable_image"),
    ("corrupt image a.jpg: image file is truncated", "unreadable_image"),
    ("empty file: a.jpg", "unreadable_image"),
    ("not a regular file: a.jpg", "unreadable_image"),
    ("preprocessing failed: a.jpg: absolute aspect ratio must be smaller than 200", "unreadable_image"),
    ("file too large: a.jpg (over 256 MiB)", "too_large"),
    ("image too large (decompression bomb guard): a.jpg: Image size exceeds limit", "too_large"),
    ("prompt too long: 9000 tokens (8000 for the image) leave no room", "prompt_too_long"),
    ("empty summary", "empty_summary"),
    ("out of GPU memory on a single image", "out_of_memory"),
    ("generation failed: OutOfMemoryError: CUDA out of memory", "out_of_memory"),
    ("generation failed: RuntimeError: boom", "engine_error"),
    ("preparing the batch failed: ValueError: x", "engine_error"),
    ("run 3 input root /data is outside STAGE_A_INPUT_ROOTS", "outside_root"),
    ("path leaves the input root: ../x.jpg", "outside_root"),
    ("absolute path not allowed: /etc/passwd", "outside_root"),
    ("gave up after 5 deliveries without a result", "gave_up"),
    ("something new", "other"),
    ("", "other"),
    (None, "other"),
])
def test_failure_class(error: str | None, expected: str) -> None:
    assert failure_class(error) == expected
    assert expected in FAILURE_CLASSES
