"""`stage-a status RUN`: what a run is doing, from the results store and the broker (monitor.report)."""

from __future__ import annotations

import json
import sys
import time

import click

from cli.commands.options import require_existing_sqlite
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.terminal import printable

DB_HELP = "Results database path or URL (env STAGE_A_DATABASE_URL)."


def open_store(db: str | None, settings: Settings):  # type: ignore[no-untyped-def]  # -> ResultStore
    """The store named by --db or STAGE_A_DATABASE_URL; a UserError when neither is given."""

    if not db and not settings.database_url:
        raise UserError("no results database: pass --db or set STAGE_A_DATABASE_URL")
    url = settings.results_database(db)
    require_existing_sqlite(url, "pass --db or set STAGE_A_DATABASE_URL")
    return settings.open_store(url)


@click.command()
@click.argument("run_id", metavar="RUN", type=int)
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the same as `serve`'s /api/runs/RUN).")
@click.option("--watch", is_flag=True,
              help="Refresh until the run is finished or cancelled; a stalled run says why.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option("--exit-code", "exit_code", is_flag=True,
              help="Exit with the run's state: 0 finished clean, 3 finished with failed images, 4 running, "
                   "5 stalled, 6 cancelled (2: a usage error, as always).")
def status(run_id: int, db: str | None, as_json: bool, watch: bool, interval: float, exit_code: bool) -> None:
    """State of RUN (running, stalled, finished, cancelled) and why; images and groups done, failed
    (by reason class), pending and in flight; dead letters; broker queue; workers online; throughput,
    ETA; stage timings.

    Exit status 0 whatever the state, unless --exit-code: then 0 finished with no failed image,
    3 finished with failed images, 4 running, 5 stalled, 6 cancelled, for cron jobs and health checks
    (healthy: below 5). With --watch, the state it ends on.
    """
    from monitor.report import QueueProbe, build_report
    from monitor.text import describe, watch_line

    if interval <= 0:
        raise UserError(f"--interval must be > 0, got {interval}")
    settings = Settings.from_env()
    store = open_store(db, settings)
    probe = QueueProbe(settings)
    writers = not as_json  # the JSON object is /api/runs/RUN's, which skips that scan
    report = build_report(store, run_id, settings, probe, writers=writers)
    if watch:
        last = ""
        tty = sys.stderr.isatty()
        while report.state not in ("finished", "cancelled"):
            line = watch_line(report)
            if tty:
                click.echo("\r\033[K" + line, nl=False, err=True)
            elif line != last:
                click.echo(line, err=True)
            last = line
            time.sleep(interval)
            report = build_report(store, run_id, settings, probe, writers=writers)
        if tty:
            click.echo("\r\033[K" + watch_line(report), err=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        click.echo(printable(describe(report)))
    if exit_code:
        sys.exit(state_exit_code(report.state, report.failed))


EXIT_CODES = {"finished": 0, "running": 4, "stalled": 5, "cancelled": 6}
FINISHED_WITH_FAILURES = 3


def state_exit_code(state: str, failed: int) -> int:
    """`status --exit-code`'s exit status for a run in ``state`` with ``failed`` failed images."""
    if state == "finished" and failed:
        return FINISHED_WITH_FAILURES
    return EXIT_CODES[state]
