"""The output record contract (SPEC section 6): one JSONL line per photo group.

Every line is validated before it is written and when it is read back, so a bad record is
caught where it is produced, with a message that names the offending field.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

LABELS = ("pass", "fail")
REQUIRED_KEYS = ("group_id", "mission", "label", "images", "per_image")
GT_KEYS = ("gt_fail_reason_texts", "gt_fail_reason_text")
REASON_SEPARATOR = " | "


_JSON = json.JSONEncoder(ensure_ascii=False)
"""json.dumps(d, ensure_ascii=False) without building an encoder per line."""


class RecordError(ValueError):
    """A record that breaks the output contract."""


def image_keys(n: int) -> list[str]:
    return list(_image_keys(n))


@functools.lru_cache(maxsize=1024)
def _image_keys(n: int) -> tuple[str, ...]:
    """image_1..image_n (an export asks for the same few group sizes millions of times)."""
    return tuple(f"image_{i}" for i in range(1, n + 1))


def _image_index(key: str) -> tuple[int, str]:
    num = key.removeprefix("image_")
    return (int(num), key) if num.isdigit() else (0, key)


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not value.isspace()  # (value.strip() != "", no copy)


def _all_non_empty_str(values: Any) -> bool:
    """Every item a string with a non-space character (C-level loops: an export checks millions)."""
    try:
        return all(values) and not any(map(str.isspace, values))
    except TypeError:  # an item that is not a string
        return False


def validate_record(d: Any) -> None:
    """Raise RecordError naming the first problem; return None when ``d`` is a valid record."""
    if not isinstance(d, dict):
        raise RecordError(f"record must be a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise RecordError(f"missing key(s): {', '.join(missing)}")
    # Unknown keys are refused: a typo'd field would otherwise be carried along silently.
    unknown = [k for k in d if k not in REQUIRED_KEYS and k not in GT_KEYS]
    if unknown:
        raise RecordError(f"unknown key(s): {', '.join(map(str, unknown))}")
    for key in ("group_id", "mission"):
        if not _non_empty_str(d[key]):
            raise RecordError(f"{key} must be a non-empty string, got {d[key]!r}")
    gid = d["group_id"]
    if d["label"] not in LABELS:
        raise RecordError(f"group {gid}: label must be 'pass' or 'fail', got {d['label']!r}")

    images = d["images"]
    if not isinstance(images, list) or not images:
        raise RecordError(f"group {gid}: images must be a non-empty list")
    if not _all_non_empty_str(images):
        for i, name in enumerate(images):
            if not _non_empty_str(name):
                raise RecordError(f"group {gid}: images[{i}] must be a non-empty string, got {name!r}")
    if len(set(images)) != len(images):
        raise RecordError(f"group {gid}: images contains duplicate file names")

    per_image = d["per_image"]
    if not isinstance(per_image, dict):
        raise RecordError(f"group {gid}: per_image must be an object")
    expected = _image_keys(len(images))
    if list(per_image) != list(expected) and set(per_image) != set(expected):  # (in order: the usual case)
        extra = sorted(set(per_image) - set(expected))
        lacking = [k for k in expected if k not in per_image]
        raise RecordError(
            f"group {gid}: per_image keys must be exactly {expected[0]}..{expected[-1]} "
            f"({len(images)} images); missing {lacking}, unexpected {extra}"
        )
    if not _all_non_empty_str(per_image.values()):
        for key, summary in per_image.items():
            if not _non_empty_str(summary):
                raise RecordError(f"group {gid}: per_image.{key} must be a non-empty string, got {summary!r}")

    _validate_gt(d, gid)


def _validate_gt(d: dict[str, Any], gid: str) -> None:
    present = [k for k in GT_KEYS if k in d]
    if not present:
        return
    if d["label"] != "fail":
        raise RecordError(f"group {gid}: {', '.join(present)} only allowed on fail records")
    if len(present) != len(GT_KEYS):
        raise RecordError(f"group {gid}: gt_fail_reason_texts and gt_fail_reason_text go together")
    texts, text = d["gt_fail_reason_texts"], d["gt_fail_reason_text"]
    if not isinstance(texts, list) or not all(_non_empty_str(t) for t in texts):
        raise RecordError(f"group {gid}: gt_fail_reason_texts must be a list of non-empty strings")
    if texts != sorted(set(texts)):
        raise RecordError(f"group {gid}: gt_fail_reason_texts must be sorted and distinct")
    want = REASON_SEPARATOR.join(texts) if texts else None
    if text != want:
        raise RecordError(f"group {gid}: gt_fail_reason_text must be {want!r}, got {text!r}")


@dataclass
class GroupRecord:
    group_id: str
    mission: str
    label: str  # "pass" | "fail"
    images: list[str]
    per_image: dict[str, str]
    # Set only on fail records when reviewer reasons were attached (add-fail-reasons).
    gt_fail_reason_texts: list[str] | None = None
    gt_fail_reason_text: str | None = None

    def set_fail_reasons(self, reasons: list[str]) -> None:
        """Attach reviewer reasons in canonical form (sorted, distinct, joined)."""
        texts = sorted({r for r in reasons if r})
        self.gt_fail_reason_texts = texts
        self.gt_fail_reason_text = REASON_SEPARATOR.join(texts) if texts else None

    def to_dict(self) -> dict[str, Any]:
        per_image = self.per_image
        if list(per_image) != list(_image_keys(len(per_image))):
            # Canonical image order whatever order the dict was built in.
            per_image = {k: per_image[k] for k in sorted(per_image, key=_image_index)}
        d: dict[str, Any] = {
            "group_id": self.group_id,
            "mission": self.mission,
            "label": self.label,
            "images": list(self.images),
            "per_image": dict(per_image),
        }
        if self.gt_fail_reason_texts is not None:
            d["gt_fail_reason_texts"] = list(self.gt_fail_reason_texts)
            d["gt_fail_reason_text"] = self.gt_fail_reason_text
        return d

    def to_json_line(self) -> str:
        """Validated JSON line (with trailing newline); raises RecordError on a bad record."""
        d = self.to_dict()
        validate_record(d)
        return _JSON.encode(d) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupRecord:
        validate_record(d)
        return cls(
            group_id=d["group_id"],
            mission=d["mission"],
            label=d["label"],
            images=list(d["images"]),
            per_image=dict(d["per_image"]),
            gt_fail_reason_texts=list(d["gt_fail_reason_texts"]) if "gt_fail_reason_texts" in d else None,
            gt_fail_reason_text=d.get("gt_fail_reason_text"),
        )
