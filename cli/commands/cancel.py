"""`stage-a cancel RUN`: the run becomes cancelled; its queued messages are dropped, workers stop taking it."""

from __future__ import annotations

from dataclasses import replace

import click

from cli.commands.status import DB_HELP, open_store


@click.command()
@click.argument("run_id", metavar="RUN", type=int)
@click.option("--db", help=DB_HELP)
@click.option("--broker", help="Redis URL (env STAGE_A_BROKER_URL).")
@click.option("--keep-queued", is_flag=True,
              help="Leave the run's queued messages on the broker (workers acknowledge them without work).")
def cancel(run_id: int, db: str | None, broker: str | None, keep_queued: bool) -> None:
    """Cancel RUN: workers drop its messages and stop between model batches; results so far are kept.

    Its messages still on the queue are removed (other runs' are untouched); ones already delivered
    are acknowledged without work. The reclaimer never re-enqueues a cancelled run's images, and
    `stage-a export` of it writes the complete groups and says the run was cancelled. Idempotent.
    """
    from stage_a.settings import Settings

    settings = Settings.from_env()
    if broker:
        settings = replace(settings, broker_url=broker)
    store = open_store(db, settings)
    try:
        info = store.get_run(run_id)
        counts = store.queries.counts(run_id)
        if counts.finished and not info.cancelled:  # nothing left to stop: a finished run stays finished
            click.echo(f"run {run_id} is already finished ({counts.done} done, {counts.failed} failed); "
                       "nothing to cancel")
            return
        newly = store.cancel_run(run_id)
        info = store.get_run(run_id)
        counts = store.queries.counts(run_id)
        store_id = store.store_id
    finally:
        store.close()
    when = info.cancelled_at.strftime("%Y-%m-%d %H:%M:%S UTC") if info.cancelled_at else "?"
    click.echo(f"run {run_id}: {'cancelled' if newly else 'already cancelled'} at {when}; "
               f"{counts.done} done, {counts.failed} failed, {counts.pending + counts.leased} not processed")
    if keep_queued or not info.farm:
        return
    from stage_a.errors import first_line
    from stage_a.queue import TaskQueue

    queue = TaskQueue(settings)
    where = queue.queue_for(info.route)
    try:
        # its model's queue, then the plain one
        dropped = queue.drop_run(run_id, store_id, where) + queue.drop_run(run_id, store_id)
    except Exception as exc:  # the cancellation itself is recorded; workers drop the messages anyway
        click.echo(f"stage-a: warning: could not remove queued messages ({first_line(exc)}); "
                   "workers will acknowledge them without work", err=True)
        return
    click.echo(f"run {run_id}: {dropped} queued images removed from {where!r}")
