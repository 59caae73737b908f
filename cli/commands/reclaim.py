"""`stage-a reclaim`: one recovery pass (the workers also run it in the background)."""

from __future__ import annotations

import click


@click.command()
@click.option("--loop", is_flag=True, help="Keep running every STAGE_A_RECLAIM_INTERVAL seconds.")
def reclaim(loop: bool) -> None:
    """Re-enqueue images whose lease expired or whose worker stopped beating (STAGE_A_HOLDER_TIMEOUT),
    restore the unacknowledged messages of worker processes that died holding them, and re-enqueue pending
    images whose messages were lost (sent 1,000 at a time)."""
    from stage_a.settings import Settings
    from workers.reclaimer import Reclaimer

    r = Reclaimer(Settings.from_env())
    if loop:
        r.loop()
    report = r.once()
    click.echo(f"re-enqueued {report.expired} expired, {report.dead_holders} from offline workers and "
               f"{report.orphaned} orphaned images; restored {report.restored} messages held by offline workers")
