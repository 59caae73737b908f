"""`stage-a run`: the whole job on one machine with no broker (the embedded default)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cli.commands.options import (
    absolute_path,
    build_spec,
    make_output_dir,
    require_input_dir,
    run_options,
    setup_logging,
)
from stage_a.config import ENGINES
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.terminal import printable

DEMO_MISSION = "挡风板安装检查"


# What a run recorded when it was registered: a resume continues with those, whatever is given now.
_RECORDED_ON_REGISTRATION = ("input_dir", "dataset", "prompt_profile", "batch_size", "max_pixels", "max_new_tokens",
                             "temperature", "top_p", "repetition_penalty", "pass_group_number",
                             "fail_group_number", "sample_seed", "sharding_mode", "reuse")


def _warn_ignored_on_resume(run_id: int) -> None:
    """Say which options given for a resume are not used (the run's recorded ones are), never mix."""
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in _RECORDED_ON_REGISTRATION
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        names = ", ".join(p.opts[0] for p in given)
        click.echo(f"stage-a: warning: {names} ignored: run {run_id} continues with the options it was "
                   "registered with (start a new run to change them)", err=True)


def parse_gpus(value: str | None) -> list[str] | None:
    """'0,1,2,3' -> one process per GPU; 'cpu' -> one CPU process; 'cpu,cpu' -> two CPU processes."""
    if value is None or value.strip() == "":
        return None
    parts = [p.strip() for p in value.split(",")]
    for p in parts:
        if p != "cpu" and not p.isdigit():
            raise UserError(f"--gpus must be 'cpu' or a comma-separated list of GPU indices like 0,1,2,3; got {value!r}")
    if len(set(p for p in parts if p != "cpu")) != len([p for p in parts if p != "cpu"]):
        raise UserError(f"--gpus lists a GPU twice: {value!r}")
    return parts


@click.command(context_settings={"show_default": True})
@run_options
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("stage_a_output"), help="Where the JSONL, failure report (and default database) go.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (single-process runs).")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="transformers", help="transformers: left-padded static batches (the default); vllm: continuous batching and prefix caching (needs the vllm package, see README).")
@click.option("--gpus", help="Run one pinned engine process per listed GPU, e.g. 0,1,2,3 ('cpu' = CPU; 'cpu,cpu' = two CPU processes).")
@click.option("--verify-inputs", is_flag=True, help="Log hashes, sizes, image_grid_thw and token counts of the first batch.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (--run ID, default: the mission's latest run in --db): only unfinished images are processed.")
@click.option("--run", "run_id", type=int, help="Run id to resume.")
@click.option("--postprocess", is_flag=True, help="Re-apply clean-up and validation to the exported JSONL.")
@click.option("--add-gt-fail-reason", is_flag=True, help="Attach reviewer fail reasons from --excel-path (BBU only).")
@click.option("--excel-path", type=click.Path(path_type=Path), default=Path("output_post/BBU_scene_latest.xlsx"), help="Excel sheet for --add-gt-fail-reason.")
@click.option("--temporary-db", is_flag=True, hidden=True, help="The --db is removed after the job (the launcher's): never print its path on success.")
def run(**kw: Any) -> None:
    """Summarize every image of a mission with Qwen3-VL in left-padded batches and export the JSONL.

    With no --checkpoint a tiny random-weight Qwen3-VL is built (its summaries are meaningless);
    with neither --checkpoint nor --input-dir a small sample tree is generated too, so a bare
    `stage-a run` shows the whole job working on a fresh machine.
    """
    setup_logging(kw["log_level"], kw["debug"])
    from engine.hosting import check_engine

    check_engine(kw["engine"])
    gpus = parse_gpus(kw["gpus"])
    if gpus:
        from engine.loader import check_gpus

        check_gpus(gpus)
    elif kw["device"].startswith("cuda"):
        from engine.loader import resolve_device

        resolve_device(kw["device"])
    if kw["run_id"] is not None:
        from stage_a.store.runs import check_run_id

        if not kw["resume"]:
            raise UserError("--run only selects the run to continue: add --resume")
        check_run_id(kw["run_id"])
    output_dir: Path = kw["output_dir"]
    if kw["dry_run"] and kw["resume"]:
        raise UserError("--dry-run describes a new run; it cannot be combined with --resume")
    checkpoint = kw["checkpoint"]
    demo = checkpoint is None and not kw["resume"]
    settings = Settings.from_env()
    if demo:
        click.secho("stage-a: no --checkpoint: using a tiny RANDOM-WEIGHT Qwen3-VL demo model; its summaries are "
                    "meaningless (pass --checkpoint for real summaries)", fg="yellow", err=True)
        if kw["input_dir"] is None:
            kw["mission"] = kw["mission"] or DEMO_MISSION
    elif checkpoint is not None:  # --resume without --checkpoint uses the run's recorded one
        from stage_a.checkpoint import Checkpoint

        checkpoint = absolute_path(checkpoint)
        Checkpoint.open(checkpoint, settings.cache_path / "identity")
    if not kw["resume"]:
        spec = build_spec(kw, checkpoint or "", settings.data_dir, settings.reuse)
        input_dir = kw["input_dir"]
        if input_dir is None and demo:
            from producer.sample_data import make_sample_tree

            input_dir = settings.cache_path / "sample-input"
            if not (input_dir / spec.mission).is_dir():
                make_sample_tree(input_dir, spec.mission)
            click.echo(f"stage-a: no --input-dir: using generated sample data in {input_dir}", err=True)
        input_dir = require_input_dir(input_dir)
        from merger.post_steps import check_post_steps

        check_post_steps(spec.dataset, kw["add_gt_fail_reason"], kw["excel_path"])
        if kw["dry_run"]:
            _dry_run(spec, input_dir, output_dir, kw, settings)
            return
    if demo:
        from engine.tiny_model import cached_tiny_checkpoint

        checkpoint = str(cached_tiny_checkpoint(settings.cache_path / "models"))


    db_url = settings.results_database(kw["db"], output_dir)
    fresh = _not_yet_existing(output_dir, db_url)  # removed again if the input turns out to be bad
    make_output_dir(output_dir)
    settings = Settings.from_env()
    store = settings.open_store(db_url)
    try:
        if kw["resume"]:
            info = store.get_run(kw["run_id"]) if kw["run_id"] is not None else store.latest_run(kw["mission"])
            if info is None:
                raise UserError(f"nothing to resume: no run{' for ' + kw['mission'] if kw['mission'] else ''} in {store.display_url}")
            run_id = info.id
            if info.cancelled:
                from cli.commands.enqueue import cancelled_refusal

                raise UserError(cancelled_refusal(info, "resumed"))
            _warn_ignored_on_resume(run_id)
            checkpoint = _resume_checkpoint(info, checkpoint, settings)  # the run names its model: exactly that one
            reset = store.reset_failed(run_id)
            n_todo = len(store.unfinished_items(run_id))
            click.echo(f"stage-a: resuming run {run_id}: {n_todo} unfinished images to process "
                       f"({reset} previously failed retried)", err=True)
        else:
            from producer.register import register_run

            reg = register_run(store, replace(spec, checkpoint=checkpoint or ""), input_dir,
                               identity_cache=settings.cache_path / "identity")
            run_id = reg.run_id
            # discovery warnings were already logged (once) by producer.discovery
            click.echo(f"stage-a: run {run_id}: {reg.groups} groups ({reg.discovered_groups} found), "
                       f"{reg.images} images -> {_db_shown(store, kw)}", err=True)
    except UserError:
        # Bad input (no mission folder, no groups, nothing to resume): leave no files behind.
        store.close()
        _remove_created(fresh)
        raise
    run_info = store.get_run(run_id)
    assert checkpoint is not None
    processed, seconds = _process(store, run_info, checkpoint, kw, gpus, settings)
    _finish(store, run_id, output_dir, processed, seconds, kw, settings)


def _dry_run(spec: Any, input_dir: Path, output_dir: Path, kw: dict[str, Any], settings: Settings) -> None:
    from cli.commands.dryrun import database_problem, fail_dry_run, print_plan
    from merger.export import output_paths
    from producer.register import plan_run
    from stage_a.secrets import redact_url

    plan = plan_run(spec, input_dir)
    jsonl, failures = output_paths(output_dir, spec.mission)
    db = settings.results_database(kw["db"], output_dir)
    print_plan(plan, spec.checkpoint, settings,
               f"output:      {jsonl} (+ {failures.name}); database {redact_url(db)}")
    fail_dry_run(database_problem(db) if "://" in db and not db.startswith("sqlite") else [])


def _resume_checkpoint(run: Any, given: str | None, settings: Settings) -> str:
    """The checkpoint that serves a resumed run: exactly the model the run was registered with.

    A farm run enqueued without --checkpoint is served by the demo model (as its workers did);
    otherwise by the recorded checkpoint, or --checkpoint when it is the same model.
    """
    from engine.hosting import run_model
    from engine.tiny_model import cached_tiny_checkpoint
    from stage_a.checkpoint import DEMO_MODEL, Checkpoint

    want = run_model(run)
    if given is None and not run.spec.checkpoint:
        click.secho(f"stage-a: run {run.id} was enqueued without a checkpoint: resuming it with the tiny "
                    "RANDOM-WEIGHT demo model (its summaries are meaningless)", fg="yellow", err=True)
        return str(cached_tiny_checkpoint(settings.cache_path / "models"))
    if given is not None and want == DEMO_MODEL:
        raise UserError(f"run {run.id} was enqueued without a checkpoint (demo model); resume it without "
                        f"--checkpoint, its other images were summarized by the demo model")
    path = given if given is not None else run.spec.checkpoint
    try:
        have = Checkpoint.open(path, settings.cache_path / "identity").identity
    except UserError as exc:
        if given is not None:
            raise
        raise UserError(f"run {run.id} was registered with checkpoint {path}, which is not usable here ({exc}); "
                        f"pass --checkpoint with the same model") from None
    if want is not None and have != want:
        raise UserError(f"run {run.id} must be served by model {want}, but {path} is model {have}")
    return path


def _resume_hint(run_id: int, db_url: str, output_dir: Path, settings: Settings) -> str:
    """A command that can be pasted back. A URL with a password is never printed (redacted it would
    not work): the hint names STAGE_A_DATABASE_URL instead."""
    import shlex

    from stage_a.secrets import redact_url

    if redact_url(db_url) == db_url:
        db = shlex.quote(db_url)
        note = ""
    else:
        db = '"$STAGE_A_DATABASE_URL"'
        note = "" if settings.database_url == db_url else \
            " (first set STAGE_A_DATABASE_URL to the database URL you gave with --db)"
    return f"stage-a run --resume --run {run_id} --db {db} --output-dir {shlex.quote(str(output_dir))}{note}"


def _process(store: Any, run_info: Any, checkpoint: str, kw: dict[str, Any],
             gpus: list[str] | None, settings: Settings) -> tuple[int, float]:
    from cli.commands.progress import RunProgress
    from engine.local_run import LocalJob, run_in_process, run_multi

    job = LocalJob(store.url, run_info.id, checkpoint, settings, kw["device"], kw["verify_inputs"],
                   kw["engine"])
    start_counts = store.queries.counts(run_info.id)
    t0 = time.perf_counter()
    with RunProgress(store, run_info.id, start_counts) as progress:
        try:
            if gpus and (len(gpus) > 1 or gpus[0] != "cpu"):
                progress.loading()
                run_multi(job, gpus, poll=progress.refresh_from_store)
            else:
                device = "cpu" if gpus == ["cpu"] else kw["device"]
                run_in_process(replace(job, device=device), on_batch=progress.advance, store=store,
                               on_loading=progress.loading)
        except KeyboardInterrupt:
            progress.stop()
            click.echo(f"\nstage-a: interrupted; finished batches are saved. Resume with: "
                       f"{_resume_hint(run_info.id, store.url, kw['output_dir'], settings)}", err=True)
            sys.exit(130)
    end_counts = store.queries.counts(run_info.id)
    processed = (end_counts.done + end_counts.failed) - (start_counts.done + start_counts.failed)
    return processed, time.perf_counter() - t0


def _finish(store: Any, run_id: int, output_dir: Path, processed: int, seconds: float, kw: dict[str, Any],
            settings: Settings) -> None:
    from merger.export import export_run
    from merger.post_steps import apply_post_steps

    report = export_run(store, run_id, output_dir, settings.export_processes, settings.export_parallel_min)
    for note in apply_post_steps(report.jsonl_path, store.get_run(run_id).spec.dataset, kw.get("postprocess", False),
                                 kw.get("add_gt_fail_reason", False), kw["excel_path"], settings.data_dir):
        click.echo(f"stage-a: {printable(note)}", err=True)
    rate = processed / seconds if seconds > 0 else 0.0
    click.echo(
        f"stage-a: run {run_id} done: {report.groups_written} groups written, {report.groups_failed} groups failed, "
        f"{report.groups_incomplete} incomplete; {processed} images in {seconds:.1f}s ({rate:.2f} images/s)\n"
        f"  jsonl:    {report.jsonl_path}\n  failures: {report.failures_path}\n  report:   {report.report_path}\n  database: {_db_shown(store, kw)}"
    )
    if report.groups_not_written:
        sys.exit(3)


def _db_shown(store: Any, kw: dict[str, Any]) -> str:
    """The database for messages; the launcher's temporary one is never named (it is about to go)."""
    if kw.get("temporary_db"):
        return "a temporary database (removed when the job ends; keep_intermediate_outputs=true keeps it)"
    return str(store.display_url)


def _not_yet_existing(output_dir: Path, db_url: str) -> list[Path]:
    """The output folder and SQLite files that this command is about to create."""
    from stage_a.store.engine import parse_url

    paths = []
    parsed = parse_url(db_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        paths += [Path(parsed.database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    paths.append(output_dir)
    return [p for p in paths if not p.exists()]


def _remove_created(paths: list[Path]) -> None:
    for p in paths:
        try:
            if p.is_dir():
                p.rmdir()  # only when empty: never delete anything else
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
