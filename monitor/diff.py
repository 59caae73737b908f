"""Compare two runs image by image: images matched by (group id, label, file name).

A matched image is `same` or `changed` when both runs have its summary, `failed_in_either` when one
of them failed it, `unfinished_in_either` while one has not finished it. The `统计` counts are
compared over the images done in both runs, so a different sample does not read as a change.
"""

from __future__ import annotations

import difflib
import html
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monitor.report import require_run
from monitor.summary import parse_summary, stat_counts
from stage_a.store.models import DONE, FAILED
from stage_a.store.queries import IRRELEVANT

if TYPE_CHECKING:
    from stage_a.store import ResultStore

Key = tuple[str, str, str]
MAX_CHANGES = 100_000
"""Changed images a diff keeps (the counts cover every image)."""


@dataclass(frozen=True)
class ImageChange:
    group_id: str
    label: str
    file: str
    a: str
    b: str
    a_position: int
    a_index: int


@dataclass(frozen=True)
class CategoryMove:
    category: str
    entries_a: int
    entries_b: int
    values: tuple[tuple[str, str, int, int], ...]
    """(attribute, value, count in A, count in B) for the counts that moved, biggest move first."""


@dataclass
class RunDiff:
    run_a: int
    run_b: int
    same: int = 0
    changed: int = 0
    only_a: int = 0
    only_b: int = 0
    failed_in_either: int = 0
    unfinished_in_either: int = 0
    irrelevant_a: int = 0
    irrelevant_b: int = 0
    categories: list[CategoryMove] = field(default_factory=list)
    changes: list[ImageChange] = field(default_factory=list)
    """Changed images in run A's output order (at most MAX_CHANGES of them)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a, "run_b": self.run_b, "same": self.same, "changed": self.changed,
            "only_a": self.only_a, "only_b": self.only_b, "failed_in_either": self.failed_in_either,
            "unfinished_in_either": self.unfinished_in_either,
            "irrelevant": {"a": self.irrelevant_a, "b": self.irrelevant_b},
            "categories": {
                c.category: {"entries": [c.entries_a, c.entries_b],
                             "values": {f"{attr}={value}": [na, nb] for attr, value, na, nb in c.values}}
                for c in self.categories
            },
            "changed_images": [{"group_id": c.group_id, "label": c.label, "file": c.file} for c in self.changes],
        }


def diff_runs(store: ResultStore, run_a: int, run_b: int) -> RunDiff:
    """Stream both runs from the store; holds run B's texts in memory (one dict entry per image)."""
    require_run(store, run_a)
    require_run(store, run_b)
    b: dict[Key, tuple[str, str | None]] = {
        (g.group_id, g.label, i.file_name): (i.status, i.summary)
        for g in store.queries.iter_export_groups(run_b) for i in g.images
    }
    d = RunDiff(run_a, run_b)
    entries_a: Counter[str] = Counter()
    entries_b: Counter[str] = Counter()
    values_a: Counter[tuple[str, str, str]] = Counter()
    values_b: Counter[tuple[str, str, str]] = Counter()
    for g, img in ((grp, img) for grp in store.queries.iter_export_groups(run_a) for img in grp.images):
        other = b.pop((g.group_id, g.label, img.file_name), None)
        if other is None:
            d.only_a += 1
            continue
        st_b, sum_b = other
        if FAILED in (img.status, st_b):
            d.failed_in_either += 1
            continue
        if img.status != DONE or st_b != DONE:
            d.unfinished_in_either += 1
            continue
        d.irrelevant_a += img.summary == IRRELEVANT
        d.irrelevant_b += sum_b == IRRELEVANT
        if img.summary == sum_b:
            d.same += 1
        else:
            d.changed += 1
            if len(d.changes) < MAX_CHANGES:
                d.changes.append(ImageChange(g.group_id, g.label, img.file_name, img.summary or "", sum_b or "",
                                             g.position, img.image_index))
        pa, pb = parse_summary(img.summary), parse_summary(sum_b)
        for parsed, entries, values in ((pa, entries_a, values_a), (pb, entries_b, values_b)):
            e, v = stat_counts(parsed)
            entries.update(e)
            values.update(v)
    d.only_b = len(b)
    d.categories = _moves(entries_a, entries_b, values_a, values_b)
    return d


def _moves(entries_a: Counter[str], entries_b: Counter[str], values_a: Counter[tuple[str, str, str]],
           values_b: Counter[tuple[str, str, str]]) -> list[CategoryMove]:
    out = []
    for cat in sorted(set(entries_a) | set(entries_b)):
        keys = {k for k in set(values_a) | set(values_b) if k[0] == cat}
        moved = sorted(((attr, value, values_a[(c, attr, value)], values_b[(c, attr, value)])
                        for c, attr, value in keys if values_a[(c, attr, value)] != values_b[(c, attr, value)]),
                       key=lambda m: (-abs(m[3] - m[2]), m[0], m[1]))
        if moved or entries_a[cat] != entries_b[cat]:
            out.append(CategoryMove(cat, entries_a[cat], entries_b[cat], tuple(moved)))
    return out


def highlight(a: str, b: str) -> tuple[str, str]:
    """HTML of ``a`` and ``b`` with the parts that differ wrapped in <del> / <ins> (character diff)."""
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    out_a: list[str] = []
    out_b: list[str] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        sa, sb = html.escape(a[i1:i2]), html.escape(b[j1:j2])
        if op == "equal":
            out_a.append(sa)
            out_b.append(sb)
        else:
            if sa:
                out_a.append(f"<del>{sa}</del>")
            if sb:
                out_b.append(f"<ins>{sb}</ins>")
    return "".join(out_a), "".join(out_b)


def describe_diff(d: RunDiff, examples: int = 20) -> str:
    lines = [
        f"run {d.run_a} -> run {d.run_b} (images matched by group id, label and file name)",
        f"images: {d.same} same, {d.changed} changed, {d.only_a} only in {d.run_a}, {d.only_b} only in {d.run_b}, "
        f"{d.failed_in_either} failed in either, {d.unfinished_in_either} unfinished in either",
        f"irrelevant ({IRRELEVANT}): {d.irrelevant_a} -> {d.irrelevant_b}",
    ]
    if d.categories:
        lines.append("统计 counts that moved (images done in both runs):")
        for c in d.categories:
            moved = "; ".join(f"{attr}={value} {na} -> {nb} ({nb - na:+d})" for attr, value, na, nb in c.values[:8])
            more = f"; ... {len(c.values) - 8} more" if len(c.values) > 8 else ""
            lines.append(f"  {c.category}: entries {c.entries_a} -> {c.entries_b}" + (f"; {moved}{more}" if moved else ""))
    else:
        lines.append("统计 counts: no change")
    if d.changes:
        lines.append(f"changed images (first {min(examples, len(d.changes))} of {d.changed}):")
        lines += [f"  {c.group_id} {c.label} {c.file}" for c in d.changes[:examples]]
    return "\n".join(lines)
