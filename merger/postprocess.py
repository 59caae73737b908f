"""``postprocess`` (SPEC section 9): re-clean every summary of an existing JSONL and re-validate it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from merger.jsonl_io import atomic_write_lines, read_records, resolve_target
from stage_a.cleanup import clean_summary
from stage_a.errors import UserError
from stage_a.records import GroupRecord


@dataclass
class PostprocessReport:
    records: int = 0
    summaries_changed: int = 0


def postprocess_file(path: Path, output: Path | None = None, inplace: bool = False) -> PostprocessReport:
    """Rewrite ``path`` to ``output`` (or onto itself when ``inplace``) with cleaned summaries.

    Records are streamed straight into a temp file, so memory stays flat on big files; the
    rename happens only after the last line was read and validated, so a bad line (reported as
    ``path:line``) or an interruption leaves the target exactly as it was.
    """
    path = Path(path)
    target = resolve_target(path, output, inplace)
    report = PostprocessReport()

    def cleaned_lines() -> Iterator[str]:
        for line_no, d in read_records(path):
            rec = GroupRecord.from_dict(d)
            for key, summary in rec.per_image.items():
                new = clean_summary(summary)
                if not new:
                    raise UserError(
                        f"{path}:{line_no}: group {rec.group_id} ({rec.label}) {key}: "
                        "summary is empty after clean-up"
                    )
                if new != summary:
                    rec.per_image[key] = new
                    report.summaries_changed += 1
            report.records += 1
            yield rec.to_json_line()

    atomic_write_lines(target, cleaned_lines())
    return report
