"""`stage-a export`: JSONL + failure report of a run already in the database."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.commands.options import make_output_dir, require_existing_sqlite
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.terminal import printable


@click.command(context_settings={"show_default": True})
@click.argument("run_arg", metavar="[RUN]", type=int, required=False)
@click.option("--run", "run_id", type=int, help="Run id (same as the RUN argument).")
@click.option("--mission", help="Export the latest run of this mission instead of a run id.")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("stage_a_output"), help="Where the files go.")
@click.option("--db", help="Results database path or URL (env STAGE_A_DATABASE_URL; default <output-dir>/stage_a_results.db).")
@click.option("--require-finished", is_flag=True, help="Refuse (exit 4, no files) while images are still pending.")
@click.option("--postprocess", is_flag=True, help="Re-apply clean-up and validation to the exported JSONL.")
@click.option("--add-gt-fail-reason", is_flag=True, help="Attach reviewer fail reasons from --excel-path (BBU only).")
@click.option("--excel-path", type=click.Path(path_type=Path), default=Path("output_post/BBU_scene_latest.xlsx"), help="Excel sheet for --add-gt-fail-reason.")
def export(run_arg: int | None, run_id: int | None, mission: str | None, output_dir: Path, db: str | None,
           require_finished: bool, postprocess: bool, add_gt_fail_reason: bool, excel_path: Path) -> None:
    """Write <output-dir>/<mission>_stage_a.jsonl (complete groups, in order) and the failure report.

    A run that is not finished is exported with its complete groups only, and says so.
    """
    from merger.export import export_run
    from merger.post_steps import apply_post_steps
    from stage_a.store.runs import check_run_id

    if run_id is not None and run_arg is not None and run_id != run_arg:
        raise UserError(f"two different run ids given: RUN {run_arg} and --run {run_id}")
    run_id = run_id if run_id is not None else run_arg
    if run_id is None and not mission:
        raise UserError("give a run id (RUN or --run) or --mission")
    if run_id is not None:
        check_run_id(run_id)
    settings = Settings.from_env()
    url = settings.results_database(db, output_dir)
    require_existing_sqlite(url, "pass --db, or the --output-dir of the run")
    settings = Settings.from_env()
    store = settings.open_store(url)
    info = store.get_run(run_id) if run_id is not None else store.latest_run(mission)
    if info is None:
        raise UserError(f"no run for mission {mission!r} in {store.display_url}")
    counts = store.queries.counts(info.id)
    if info.cancelled:
        when = info.cancelled_at.strftime("%Y-%m-%d %H:%M:%S UTC") if info.cancelled_at else "?"
        click.echo(f"stage-a: warning: run {info.id} was cancelled at {when}", err=True)
    if not counts.finished:
        msg = (f"run {info.id} {'was cancelled' if info.cancelled else 'is not finished'}: "
               f"{counts.pending + counts.leased} of {counts.images_total} images pending")
        if require_finished:
            click.echo(f"stage-a: {printable(msg)}; nothing written", err=True)
            sys.exit(4)
        click.echo(f"stage-a: warning: {printable(msg)}; exporting complete groups only", err=True)
    make_output_dir(output_dir)
    report = export_run(store, info.id, output_dir, settings.export_processes, settings.export_parallel_min)
    for note in apply_post_steps(report.jsonl_path, info.spec.dataset, postprocess, add_gt_fail_reason, excel_path,
                                 settings.data_dir):
        click.echo(f"stage-a: {printable(note)}", err=True)
    click.echo(f"stage-a: run {info.id}{' (cancelled)' if info.cancelled else ''}: {report.groups_written} groups written, {report.groups_failed} failed, "
               f"{report.groups_incomplete} incomplete\n  jsonl:    {report.jsonl_path}\n  failures: {report.failures_path}\n  report:   {report.report_path}")
    click.echo("  models:   " + (", ".join(f"{m} ({n} images)" for m, n in report.models) or "none (no image summarized)"))
    if report.groups_not_written:
        sys.exit(3)

