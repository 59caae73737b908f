"""`stage-a runs` and `stage-a dead-letters`: lists read from the results store."""

from __future__ import annotations

import json

import click

from cli.commands.status import DB_HELP, open_store
from stage_a.settings import Settings
from stage_a.store.runs import check_run_id
from stage_a.terminal import printable


@click.command()
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Show at most this many runs.")
def runs(db: str | None, as_json: bool, limit: int) -> None:
    """Runs, newest first: id, created (UTC), mission, model, state, images finished/failed/pending/in flight,
    dead letters."""
    from monitor.report import list_runs
    from monitor.text import runs_table

    settings = Settings.from_env()
    rows = list_runs(open_store(db, settings), limit, settings)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], ensure_ascii=False))
    else:
        click.echo(printable(runs_table(rows)))


@click.command("dead-letters")
@click.argument("run_id", metavar="[RUN]", type=int, required=False)
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (full payloads).")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Show at most this many, newest first.")
def dead_letters(run_id: int | None, db: str | None, as_json: bool, limit: int) -> None:
    """Task messages the workers rejected (malformed, unknown run, path outside the input roots):
    when, which worker, why, and the message. Only RUN's when RUN is given."""
    from monitor.text import dead_letters_table, fmt_time

    if run_id is not None:
        check_run_id(run_id)
    store = open_store(db, Settings.from_env())
    rows = store.queries.dead_letter_rows(run_id, limit)
    if as_json:
        click.echo(json.dumps([
            {"id": d.id, "received_at": fmt_time(d.received_at).replace(" ", "T"), "run_id": d.run_id,
             "worker": d.worker, "reason": d.reason, "payload": d.payload} for d in rows
        ], ensure_ascii=False))
        return
    click.echo(printable(dead_letters_table(rows)))
