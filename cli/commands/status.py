"""`stage-a status RUN`: progress of a run from the results database."""

from __future__ import annotations

import time
from datetime import datetime

import click

from stage_a.settings import Settings, database_url


def _describe(run_id: int, counts, now: datetime) -> str:  # type: ignore[no-untyped-def]
    total = counts.images_total
    finished = counts.done + counts.failed
    lines = [
        f"run {run_id}: images {finished}/{total} finished (done {counts.done}, failed {counts.failed}, "
        f"pending {counts.pending}, in flight {counts.leased})",
        f"groups: {counts.groups_done}/{counts.groups_total} complete, {counts.groups_failed} with failures",
    ]
    if counts.first_update and counts.last_update and finished:
        span = max((counts.last_update - counts.first_update).total_seconds(), 1e-6)
        rate = finished / span
        left = counts.pending + counts.leased
        eta = f"{left / rate:.0f}s" if rate > 0 and left else "-"
        lines.append(f"throughput: {rate:.2f} images/s; ETA {eta}")
    lines.append("workers: " + (", ".join(counts.workers) if counts.workers else "-"))
    lines.append("state: " + ("finished" if counts.finished else "running"))
    return "\n".join(lines)


@click.command()
@click.argument("run_id", type=int)
@click.option("--db", help="Results database path or URL (env STAGE_A_DATABASE_URL).")
@click.option("--watch", is_flag=True, help="Refresh with a progress bar until the run is finished.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status(run_id: int, db: str | None, watch: bool, interval: float) -> None:
    """Pending / done / failed images and groups, throughput, ETA and which workers of RUN_ID."""
    from stage_a.errors import UserError
    from stage_a.store import ResultStore
    from stage_a.store.runs import check_run_id

    check_run_id(run_id)
    if not db and not Settings.from_env().database_url:
        raise UserError("no results database: pass --db or set STAGE_A_DATABASE_URL")
    store = ResultStore(database_url(db))
    store.get_run(run_id)
    if not watch:
        click.echo(_describe(run_id, store.counts(run_id), datetime.now()))
        return
    from cli.commands.progress import RunProgress

    counts = store.counts(run_id)
    with RunProgress(store, run_id, counts) as progress:
        while not counts.finished:
            time.sleep(interval)
            progress.refresh_from_store()
            counts = store.counts(run_id)
    click.echo(_describe(run_id, counts, datetime.now()))
