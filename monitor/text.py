"""Plain-text renderings of reports for the terminal (`status`, `runs`, `dead-letters`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from monitor.report import RunReport, RunSummary, human_duration, reclaimer_line
from stage_a.store.queries import DeadLetterRow, WorkerBeat


def fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") + "Z" if t else "-"


def fmt_rate(rate: float | None, unit: str = "images/s") -> str:
    if rate is None:
        return "-"
    return f"{rate:.2f} {unit}" if rate < 100 else f"{rate:,.0f} {unit}"


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s")


def ago(t: datetime | None, now: datetime) -> str:
    return "never" if t is None else f"{human_duration((now - t).total_seconds())} ago"


def worker_line(w: WorkerBeat, now: datetime) -> str:
    batch = "no batch yet"
    if w.last_batch_at is not None:
        batch = (f"last batch {w.last_batch_images or 0} images in {w.last_batch_seconds or 0:.1f}s "
                 f"{ago(w.last_batch_at, now)}")
    return (f"  {w.name}  {w.state}  model {w.model or '-'} ({w.engine or '-'}, {w.device or '-'})  "
            f"run {w.run_id if w.run_id is not None else '-'}  {batch}  {fmt_rate(w.images_per_s)}  "
            f"heartbeat {human_duration(w.heartbeat_age_s)} ago")


def describe(r: RunReport) -> str:
    """The full `stage-a status` text."""
    t = r.throughput
    served = ", ".join(f"{_served_label(m.model, r)} ({m.engine or '-'}): {m.images}" for m in r.models_served)
    lines = [
        f"run {r.run_id}: {r.mission} ({r.dataset}), {'farm' if r.farm else 'local'} run, {r.sharding_mode}",
        f"checkpoint: {r.checkpoint or '- (none: the random-weight demo model)'}" + (f"  model: {r.model}" if r.model else ""),
        f"served by: {served or '-'}",
        f"created {fmt_time(r.created_at)}, elapsed {human_duration(r.elapsed_s)}; "
        f"last result {ago(r.last_result_at, r.now)}",
        f"images {r.finished_images}/{r.images_total} finished (done {r.done}, failed {r.failed}, "
        f"pending {r.pending}, in flight {r.in_flight})",
        *([f"failures by class{_sampled(r)}: {classes_text(r.failures_by_class)}"] if r.failures_by_class else []),
        *([reused_line(r)] if r.reused else []),
        f"groups: {r.groups_complete}/{r.groups_total} complete, {r.groups_with_failures} with failures",
        f"dead letters: {r.dead_letters}" + (f" (stage-a dead-letters {r.run_id})" if r.dead_letters else ""),
        "queue: " + (f"{r.queue_length} messages waiting (all runs)" + (f"; {r.queue_note}" if r.queue_note else "")
                     if r.queue_length is not None
                     else f"unknown ({r.queue_note})" if r.queue_note else "unknown"),
        f"throughput: {fmt_rate(t.recent_images_per_s)} over the last {human_duration(t.window_s)}, "
        f"{fmt_rate(t.overall_images_per_s)} overall; ETA {human_duration(t.eta_s)}",
        f"stages: preprocess {fmt_ms(r.timings.preprocess_ms)}/image, generate {fmt_ms(r.timings.generate_ms)}/image, "
        f"{fmt_rate(r.timings.tokens_per_s, 'tokens/s')}",
        f"workers online: {r.workers_online}",
    ]
    lines += [worker_line(w, r.now) for w in r.workers]
    lines.append("workers: " + (", ".join(r.result_writers) if r.result_writers else "-"))
    lines += [reclaimer_line(b) for b in r.reclaimers_failing]
    lines.append(f"state: {r.state}" + (f" ({r.reason})" if r.reason else ""))
    return "\n".join(lines)


def reused_line(r: RunReport) -> str:
    """"reused: 19980 of 20000 done images (from run 6: 19980)": summaries taken instead of generated."""
    sources = ", ".join(f"run {run}: {n}" for run, n in r.reused_from)
    looked = sum(n for _, n in r.reused_from)
    if sources and looked < r.reused:
        sources += f"; of {looked} reused images looked at"
    return f"reused: {r.reused} of {r.done} done images" + (f" (from {sources})" if sources else "")


def classes_text(by_class: dict[str, int]) -> str:
    """"unreadable_image 2, other 1"."""
    return ", ".join(f"{c} {n}" for c, n in by_class.items())


def _served_label(model: str | None, r: RunReport) -> str:
    """The model that produced results: named by the run's checkpoint folder when it is the run's model."""
    if not model:
        return "unrecorded model"
    return model_label(model, r.checkpoint) if model == r.model else model


def watch_line(r: RunReport, width: int = 30) -> str:
    """One line for `status --watch`: bar, counts, rate, ETA, state."""
    filled = int(round(r.fraction * width))
    bar = "#" * filled + "-" * (width - filled)
    t = r.throughput
    line = (f"run {r.run_id} [{bar}] {r.finished_images}/{r.images_total} ({r.fraction:.0%}) "
            f"failed {r.failed}  {fmt_rate(t.recent_images_per_s)}  ETA {human_duration(t.eta_s)}  "
            f"workers {r.workers_online}  {r.state}")
    if r.reason:
        line += f": {r.reason}"
    return line


def runs_table(runs: list[RunSummary]) -> str:
    if not runs:
        return "no runs"
    head = ("run", "created", "mission", "model", "state", "finished", "failed", "pending", "in flight", "dead")
    rows: list[tuple[str, ...]] = [head, *[
        (str(r.run_id), fmt_time(r.created_at), r.mission, model_label(r.model, r.checkpoint, short=True), r.state,
         f"{r.done + r.failed}/{r.images_total}", str(r.failed), str(r.pending), str(r.in_flight),
         str(r.dead_letters))
        for r in runs
    ]]
    return _table(rows)


def dead_letters_table(rows: list[DeadLetterRow]) -> str:
    if not rows:
        return "no dead letters"
    head = ("id", "received", "run", "worker", "reason", "payload")
    body = [
        (str(d.id), fmt_time(d.received_at), str(d.run_id) if d.run_id is not None else "-", d.worker or "-",
         _one_line(d.reason, 100), _one_line(d.payload, 80))
        for d in rows
    ]
    return _table([head, *body])


def _one_line(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def model_label(model: str | None, checkpoint: str, short: bool = False) -> str:
    """A model for people: the checkpoint folder's name beside its identity, a content hash that names
    no folder (``short``: the hash cut to 10 hex digits, for tables)."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1] if checkpoint else ""
    if not model:
        return name or "-"
    if ":" in model:  # an identity of before issue 18 (``<folder>:<hex>``) names its folder itself
        return model if not short or len(model) <= 32 else model[:31] + "…"
    shown = model[:12] if short else model
    return f"{name} {shown}" if name else shown


def _table(rows: Sequence[Sequence[str]]) -> str:
    from unicodedata import east_asian_width

    def w(s: str) -> int:
        return sum(2 if east_asian_width(ch) in "WF" else 1 for ch in s)

    widths = [max(w(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        out.append("  ".join(cell + " " * (widths[i] - w(cell)) for i, cell in enumerate(r)).rstrip())
    return "\n".join(out)


def _sampled(r: RunReport) -> str:
    """" (first N failures)" when the classes were read from the first N failed images only."""
    return f" (first {r.failures_classified} failures)" if r.failures_classified < r.failed else ""
