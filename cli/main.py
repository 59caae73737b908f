"""`stage-a` command line. Subcommands are imported only when they run (export never loads torch)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

import cli as cli_package
from stage_a.errors import UserError
from stage_a.terminal import printable

_COMMANDS = {
    "run": ("cli.commands.run", "run", "Summarize a mission's images on this machine and export the JSONL."),
    "enqueue": ("cli.commands.enqueue", "enqueue", "Record a run and queue its images for the worker farm."),
    "status": ("cli.commands.status", "status", "What a run is doing: state (running/stalled/finished/cancelled), progress, ETA, workers."),
    "runs": ("cli.commands.runs", "runs", "List runs, newest first, with state and counts."),
    "dead-letters": ("cli.commands.runs", "dead_letters",
                     "Show task messages the workers rejected (what, when, which worker, why)."),
    "serve": ("cli.commands.serve", "serve",
              "Web pages of runs (images beside summaries), JSON API and Prometheus /metrics."),
    "diff": ("cli.commands.diff", "diff", "Compare two runs image by image (changed summaries, 统计 counts)."),
    "export": ("cli.commands.export", "export", "Write a run's JSONL and failure report from the database."),
    "postprocess": ("cli.commands.post", "postprocess", "Re-clean and re-validate an existing Stage-A JSONL."),
    "add-fail-reasons": ("cli.commands.post", "add_fail_reasons",
                         "Attach reviewer fail reasons from an Excel sheet (BBU only)."),
    "cancel": ("cli.commands.cancel", "cancel",
               "Cancel a run: workers drop its queued images and stop between model batches."),
    "reclaim": ("cli.commands.reclaim", "reclaim",
                "Re-enqueue images whose worker died (expired leases); run it periodically."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help lists commands from the table, without importing every module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in _COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="stage-a")
def cli() -> None:
    """Stage-A: Qwen3-VL summaries of inspection photo groups, exported as JSONL for Stage-B."""


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="stage-a", standalone_mode=False)
    except UserError as exc:
        if cli_package.DEBUG:
            import traceback

            traceback.print_exc()
        click.echo(f"stage-a: error: {printable(str(exc))}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("stage-a: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("stage-a: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if not interrupted(exc):
            raise
        # Ctrl-C inside a driver call: the library's clean-up raised in its place (a psycopg connection
        # interrupted mid-ping cannot be reset); it is still the user's interrupt.
        click.echo("stage-a: interrupted", err=True)
        sys.exit(130)


def interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions ``exc`` was raised while handling."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return False


if __name__ == "__main__":
    main()
