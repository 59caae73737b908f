"""Summary clean-up (SPEC section 5): turn one generated text into the string stored in the JSONL.

Pure stdlib so the merger can re-apply it (``postprocess``) without torch installed.
The function is idempotent: cleaning an already cleaned summary returns it unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

IRRELEVANT = "无关图片"
STATS_KEY = "统计"
# Canonical leading keys of a summary object; any other key follows in its original order.
CANONICAL_KEYS: tuple[str, ...] = ("统计", "备注", "分组统计")

# The prompt's header line, e.g. "<DOMAIN=bbu>, <TASK=挡风板安装检查>" (full-width comma tolerated).
_HEADER_RE = re.compile(
    r"^[ \t]*<DOMAIN=[^<>\n]*>[ \t]*[,，]?[ \t]*<TASK=[^<>\n]*>[ \t]*(?:\n|$)", re.MULTILINE
)
_STATS_ASSIGN_RE = re.compile(r"统计\s*=\s*")
_GROUPS_ASSIGN_RE = re.compile(r"\s*[,，;；]?\s*分组统计\s*=\s*")
_DECODER = json.JSONDecoder()


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; letting them through would make us emit invalid JSON.
    raise ValueError(f"non-JSON constant {name}")


def _loads_summary(text: str) -> dict[str, Any] | None:
    """Parse ``text`` as a JSON object holding ``统计``; None when it is anything else."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and STATS_KEY in obj else None


def _repair_assignments(text: str) -> dict[str, Any] | None:
    """Repair ``统计=[...]`` (optionally followed by ``分组统计=[...]``) into an object.

    Only the whole text in exactly that form is repaired: anything before or after it makes
    the intent ambiguous, and then the text is kept as is.
    """
    m = _STATS_ASSIGN_RE.match(text)
    if m is None:
        return None
    try:
        stats, end = _DECODER.raw_decode(text, m.end())
    except ValueError:
        return None
    if not isinstance(stats, list):
        return None
    obj: dict[str, Any] = {STATS_KEY: stats}
    g = _GROUPS_ASSIGN_RE.match(text, end)
    if g is not None:
        try:
            groups, end = _DECODER.raw_decode(text, g.end())
        except ValueError:
            return None
        if not isinstance(groups, list):
            return None
        obj["分组统计"] = groups
    return obj if not text[end:].strip() else None


def find_summary_object(text: str) -> dict[str, Any] | None:
    """Locate the summary object in a header-free, stripped text (SPEC 5 search order)."""
    obj = _loads_summary(text)
    if obj is not None:
        return obj
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            obj = _loads_summary(line)
            if obj is not None:
                return obj
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        obj = _loads_summary(text[start : end + 1])
        if obj is not None:
            return obj
    return _repair_assignments(text)


def canonical_json(obj: dict[str, Any]) -> str:
    """Serialize with the canonical key order so equal summaries compare equal as strings."""
    ordered = {k: obj[k] for k in CANONICAL_KEYS if k in obj}
    ordered.update((k, v) for k, v in obj.items() if k not in ordered)
    return json.dumps(ordered, ensure_ascii=False, separators=(", ", ": "))


def clean_summary(text: str) -> str:
    """Return the cleaned summary; "" means the image has no usable summary (a failure).

    Where SPEC 5 is silent: ``无关图片`` is also recognised right after a header line; with no summary
    object the stripped text is kept as the model said it, but a text of header lines only cleans to ""."""
    stripped = text.strip()
    if stripped.startswith(IRRELEVANT):
        return IRRELEVANT
    body = _HEADER_RE.sub("", stripped).strip()
    if not body:
        return ""
    if body.startswith(IRRELEVANT):
        return IRRELEVANT
    obj = find_summary_object(body)
    return canonical_json(obj) if obj is not None else stripped
