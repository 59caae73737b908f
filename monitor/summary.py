"""Reading a cleaned summary (SPEC section 3/5): irrelevant, a `统计` object, or free text."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stage_a.store.queries import IRRELEVANT


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[tuple[str, int | str], ...]
    """(value, count); a count that is not a number is kept as the model wrote it."""


@dataclass(frozen=True)
class Category:
    name: str
    attributes: tuple[Attribute, ...]


@dataclass(frozen=True)
class ParsedSummary:
    kind: str
    """"irrelevant", "stats" (a JSON object with 统计), "text" (anything else), "empty"."""
    categories: tuple[Category, ...] = ()
    notes: tuple[str, ...] = ()
    """备注 (BBU)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the object (分组统计, ...), as parsed."""


def parse_summary(text: str | None) -> ParsedSummary:
    if not text or not text.strip():
        return ParsedSummary("empty")
    text = text.strip()
    if text == IRRELEVANT:
        return ParsedSummary("irrelevant")
    try:
        obj = json.loads(text)
    except ValueError:
        return ParsedSummary("text")
    if not isinstance(obj, dict) or not isinstance(obj.get("统计"), list):
        return ParsedSummary("text")
    cats = []
    for item in obj["统计"]:
        if not isinstance(item, dict):
            continue
        attrs = []
        for key, val in item.items():
            if key == "类别":
                continue
            if isinstance(val, dict):
                attrs.append(Attribute(str(key), tuple((str(v), _count(n)) for v, n in val.items())))
            else:
                attrs.append(Attribute(str(key), ((_scalar(val), 1),)))
        cats.append(Category(str(item.get("类别", "?")), tuple(attrs)))
    notes = obj.get("备注")
    extra = {k: v for k, v in obj.items() if k not in ("统计", "备注")}
    return ParsedSummary("stats", tuple(cats),
                         tuple(str(n) for n in notes) if isinstance(notes, list) else (), extra)


def _count(n: Any) -> int | str:
    if isinstance(n, bool):
        return str(n)
    if isinstance(n, int):
        return n
    if isinstance(n, float) and n.is_integer():
        return int(n)
    return _scalar(n)


def _scalar(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def stat_counts(parsed: ParsedSummary) -> tuple[Counter[str], Counter[tuple[str, str, str]]]:
    """(entries per category, count per (category, attribute, value)) of one summary."""
    entries: Counter[str] = Counter()
    values: Counter[tuple[str, str, str]] = Counter()
    for cat in parsed.categories:
        entries[cat.name] += 1
        for attr in cat.attributes:
            for value, n in attr.values:
                values[(cat.name, attr.name, value)] += n if isinstance(n, int) else 1
    return entries, values
