"""`stage-a diff A B`: two runs compared image by image (monitor.diff)."""

from __future__ import annotations

import json

import click

from cli.commands.status import DB_HELP, open_store
from stage_a.settings import Settings
from stage_a.terminal import printable


@click.command()
@click.argument("run_a", metavar="A", type=int)
@click.argument("run_b", metavar="B", type=int)
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: same, changed, only_a, only_b, failed_in_either, categories, changed_images.")
@click.option("--examples", type=click.IntRange(min=0), default=20, show_default=True,
              help="Changed images listed in the text output.")
def diff(run_a: int, run_b: int, db: str | None, as_json: bool, examples: int) -> None:
    """Compare runs A and B (e.g. two checkpoints on the same input): images matched by group id, label and
    file name; counts of same, changed, only in A or B, failed in either; how the 统计 counts moved per
    category. Exit status 0 whatever differs; `stage-a serve` shows the changed images side by side."""
    from monitor.diff import describe_diff, diff_runs

    store = open_store(db, Settings.from_env())
    result = diff_runs(store, run_a, run_b)
    if as_json:
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        click.echo(printable(describe_diff(result, examples)))
