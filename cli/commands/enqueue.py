"""`stage-a enqueue`: record a run in the database and queue its images for the farm."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import click

from cli.commands.options import absolute_path, build_spec, require_input_dir, run_options, setup_logging
from stage_a.errors import UserError, first_line
from stage_a.queue import PublishError
from stage_a.settings import Settings
from stage_a.work import ImageKey


@click.command(context_settings={"show_default": True})
@run_options
@click.option("--run", "run_id", type=int, help="Re-enqueue what is not done yet of an existing run (input options are then ignored).")
@click.option("--broker", help="Redis URL (env STAGE_A_BROKER_URL).")
@click.option("--verify-inputs", is_flag=True, help="Workers log hashes, sizes, image_grid_thw and token counts of their first batch of this run.")
@click.option("--new-run", is_flag=True, help="Start a new run even when an unfinished run has the same inputs (by default that run's id is printed and nothing is queued).")
def enqueue(run_id: int | None, broker: str | None, new_run: bool, **kw: Any) -> None:
    """Scan the input tree, sample, record the run (groups and pending images) and queue its tasks.

    per_image queues one message per image, per_group one per group. Prints the run id and counts.
    Broker and database (PostgreSQL: workers on other hosts share it) come from --broker/--db or
    STAGE_A_BROKER_URL/STAGE_A_DATABASE_URL. When an unfinished, not cancelled farm run has the same
    inputs (root, mission, model, options, sampling), its id is printed and nothing is queued
    (--new-run starts another). A cancelled run is never queued again.
    """
    from producer.publish import Publisher
    from stage_a.checkpoint import Checkpoint
    from stage_a.store.runs import check_run_id

    setup_logging(kw["log_level"], kw["debug"])
    settings = Settings.from_env()
    if broker:
        settings = replace(settings, broker_url=broker)
    db = kw["db"] or settings.database_url
    if kw["dry_run"]:
        if run_id is not None:
            raise UserError("--dry-run describes a new run; it cannot be combined with --run")
        _dry_run(kw, settings, db)
        return
    if run_id is not None:
        check_run_id(run_id)
        if new_run:
            raise UserError("--new-run starts a new run; it cannot be combined with --run")
    if not db:
        raise UserError("no results database: pass --db or set STAGE_A_DATABASE_URL (workers must reach it too)")
    refused = sqlite_refusal(kw["db"], settings)
    if refused:
        raise UserError(refused)
    if run_id is None:
        # Everything the workers would refuse is refused here, before anything is recorded or queued.
        checkpoint = absolute_path(kw["checkpoint"] or settings.checkpoint)
        spec = build_spec(kw, checkpoint, settings.data_dir, settings.reuse)
        input_dir = require_input_dir(kw["input_dir"])
        if not settings.allows_input_root(input_dir):
            raise UserError(f"input dir {input_dir} is outside STAGE_A_INPUT_ROOTS "
                            f"({os.pathsep.join(settings.input_roots)}): the workers would refuse every image")
        if checkpoint:
            Checkpoint.open(checkpoint, settings.cache_path / "identity")
    publisher = Publisher(settings)
    publisher.check()
    store = settings.open_store(settings.results_database(db))
    if run_id is not None:
        info = store.get_run(run_id)
        if info.cancelled:
            raise UserError(cancelled_refusal(info, "re-enqueued"))
        sharding, route, batch_size = info.spec.sharding_mode, info.route, info.spec.batch_size
        what = ""  # said once publishing has counted them
    else:
        from producer.register import register_run

        reg = register_run(store, spec, input_dir, farm=True, root_allowed=settings.allows_input_root,
                           identity_cache=settings.cache_path / "identity", once=not new_run)
        if reg.existing:
            _say_existing(store, reg.run_id)
            return
        if not checkpoint:  # said once the run exists (a refused enqueue prints its one error line only)
            click.secho("stage-a: warning: no --checkpoint (nor STAGE_A_CHECKPOINT): the farm will summarize "
                        "this run with the tiny RANDOM-WEIGHT demo model and its summaries will be meaningless",
                        fg="yellow", err=True)
        # discovery warnings were already logged (once) by producer.discovery
        run_id, sharding, route, batch_size = reg.run_id, spec.sharding_mode, reg.route, spec.batch_size
        what = f"run {run_id}: {reg.groups} groups ({reg.discovered_groups} found), {reg.images} images"
    t0 = time.perf_counter()
    unit = "group" if sharding == "per_group" else "image"
    items = _Counting(store.iter_unfinished_keys(run_id))  # streamed in key order, never listed
    try:
        sent = publisher.publish_keys(items, sharding, store.store_id, route, batch_size)
    except PublishError as exc:
        raise UserError(_stopped(exc, settings, run_id, unit)) from None
    dt = time.perf_counter() - t0
    what = what or f"run {run_id}: re-enqueue {items.count} unfinished images"
    click.echo(f"{what}; {sent} {unit} tasks queued in {dt:.1f}s on {publisher.queue_for(route)!r}")
    click.echo(f"run_id={run_id}")


class _Counting:
    """An iterator of image keys that counts what has been taken from it."""

    def __init__(self, items: Iterator[ImageKey]) -> None:
        self._items = items
        self.count = 0

    def __iter__(self) -> Iterator[ImageKey]:
        for it in self._items:
            self.count += 1
            yield it


def sqlite_refusal(given: str | None, settings: Settings) -> str | None:
    """Why the results database cannot serve a farm (an SQLite file), or None. ``given``: --db."""
    from stage_a.secrets import redact_url
    from stage_a.store.engine import parse_url

    url = settings.results_database(given)
    if parse_url(url).get_backend_name() != "sqlite":
        return None
    where = "--db" if given else "STAGE_A_DATABASE_URL"
    return (f"{where} {redact_url(url)} is an SQLite file: workers on other hosts cannot share an SQLite file; "
            f"use PostgreSQL (postgresql+psycopg://USER@HOST/DB) for a farm run, or `stage-a run` on one machine")


def cancelled_refusal(info: Any, what: str) -> str:
    """The one line refusing to queue or run a cancelled run again."""
    when = info.cancelled_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"run {info.id} was cancelled at {when}: it cannot be {what} (start a new run instead)"


def _say_existing(store: Any, run_id: int) -> None:
    """An unfinished run with the same inputs: its id and progress, like a normal enqueue's run_id= line."""
    counts = store.queries.counts(run_id, workers=False)
    total = counts.pending + counts.leased + counts.done + counts.failed
    click.echo(f"run {run_id} has the same inputs and is unfinished ({counts.done + counts.failed} of {total} "
               f"done); nothing queued (pass --new-run to start another)")
    click.echo(f"run_id={run_id}")


def _stopped(exc: PublishError, settings: Settings, run_id: int, unit: str) -> str:
    """One line: how far publishing got, why it stopped, and how to resume (the run is recorded)."""
    from stage_a.secrets import broker_error

    doing = "broker is full" if exc.full else "publishing stopped on broker"
    count = "an unknown number of" if exc.sent is None else str(exc.sent)
    fix = "free memory on it or raise its maxmemory" if exc.full else "when it is back"
    return (f"{broker_error(settings.broker_url, exc, doing)}; run {run_id}: {count} {unit} tasks queued; "
            f"{fix}, then `stage-a enqueue --run {run_id}` queues what is not done")


def _dry_run(kw: dict[str, Any], settings: Settings, db: str | None) -> None:
    """Discover, sample and check; the broker and database are only looked at, never written."""
    from cli.commands.dryrun import database_problem, fail_dry_run, print_plan
    from producer.register import plan_run
    from stage_a.checkpoint import DEMO_MODEL, Checkpoint
    from stage_a.queue import model_queue
    from stage_a.secrets import redact_url

    spec = build_spec(kw, kw["checkpoint"] or settings.checkpoint, settings.data_dir, settings.reuse)
    plan = plan_run(spec, require_input_dir(kw["input_dir"]))
    route = (Checkpoint.open(spec.checkpoint, settings.cache_path / "identity").base_identity if spec.checkpoint
             else DEMO_MODEL)
    queue = model_queue(settings.queue, route)
    problems: list[str] = []
    broker = ""
    try:
        from producer.publish import Publisher

        publisher = Publisher(settings)
        publisher.check(refuse_eviction=False)
        warning = publisher.eviction_warning()
        broker = f"reachable, {publisher.length(queue)} messages waiting" + (f"; {warning}" if warning else "")
        if warning:
            publisher.check()  # the real command refuses an evicting Redis: say so as it would
    except UserError as exc:
        problems.append(str(exc))
        broker = broker or f"NOT reachable ({first_line(exc)})"
    except Exception as exc:
        problems.append(f"broker NOT reachable ({first_line(exc)})")
        broker = f"NOT reachable ({first_line(exc)})"
    unit = "group" if spec.sharding_mode == "per_group" else "image"
    n = len(plan.groups) if unit == "group" else plan.images
    print_plan(plan, spec.checkpoint, settings,
               f"queue:       {n} {unit} tasks would go to {queue!r} on {redact_url(settings.broker_url)} "
               f"({broker}); results to {redact_url(db) if db else 'NO DATABASE (pass --db or set STAGE_A_DATABASE_URL)'}")
    refused = sqlite_refusal(kw["db"], settings) if db else None
    if not db:
        problems.append("no results database: pass --db or set STAGE_A_DATABASE_URL (workers must reach it too)")
    elif refused:
        problems.append(refused)
    else:
        problems += database_problem(db)
    if refused:
        click.echo(f"  problem:     {refused}")
    fail_dry_run(problems)
