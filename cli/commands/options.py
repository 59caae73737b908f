"""Options shared by `run` and `enqueue`, and turning them into a RunSpec."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from stage_a.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PROFILE,
    SHARDING_MODES,
    GenerationParams,
    RunSpec,
)
from stage_a.errors import UserError
from stage_a.terminal import printable

F = Callable[..., Any]


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


run_options = _stack(
    click.option("--mission", help="Mission name, exactly as in SPEC (e.g. 挡风板安装检查)."),
    click.option("--input-dir", type=click.Path(path_type=Path), help="Root folder holding <mission>/审核通过|审核不通过/<group>/ (the mission folder itself is accepted)."),
    click.option("--checkpoint", help="Merged Qwen3-VL folder or LoRA adapter folder. Omit to use the tiny random-weight demo model."),
    click.option("--dataset", type=click.Choice(["bbu", "rru"]), help="Domain pack for the prompt; default: from the mission."),
    click.option("--prompt-profile", default=DEFAULT_PROFILE, show_default=True, help="Prompt profile."),
    click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, help="Model batch size: images per generate() call, per GPU (not the worker's message buffer, STAGE_A_FLUSH_SIZE)."),
    click.option("--max-pixels", type=int, default=None, show_default=f"from the dataset: bbu {DEFAULT_MAX_PIXELS['bbu']}, rru {DEFAULT_MAX_PIXELS['rru']}", help="Pixel budget per image after resize."),
    click.option("--max-new-tokens", type=int, default=1024, show_default=True, help="Generation limit per image."),
    click.option("--temperature", type=float, default=0.0, show_default=True, help="0 (or <= 1e-4) = greedy decoding."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (sampling only)."),
    click.option("--repetition-penalty", type=float, default=1.05, show_default=True, help="Penalty for repeated tokens."),
    click.option("--pass-group-number", type=int, default=None, help="Keep at most this many pass groups (default: all; 0: none)."),
    click.option("--fail-group-number", type=int, default=None, help="Keep at most this many fail groups (default: all; 0: none)."),
    click.option("--sample-seed", type=int, default=42, show_default=True, help="Seed of the per-label group sampling."),
    click.option("--sharding-mode", type=click.Choice(list(SHARDING_MODES)), default="per_group", show_default=True, help="per_group: a group's images batch together; per_image: batches span groups, ordered by length."),
    click.option("--reuse/--no-reuse", "reuse", default=None, help="Take summaries already made for the same image bytes, model, prompt and options (from any run in the database) instead of generating them. Default (STAGE_A_REUSE=auto): greedy runs reuse, sampled runs do not; --reuse: sampled runs too; --no-reuse: never."),
    click.option("--db", help="Results database: a file path or SQLAlchemy URL (env STAGE_A_DATABASE_URL). Default: <output-dir>/stage_a_results.db."),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False), default="warning", show_default=True, help="Logging verbosity (any case)."),
    click.option("--debug", is_flag=True, help="Debug logging and full tracebacks (the launcher's debug=true)."),
    click.option("--dry-run", is_flag=True, help="Discover and sample, check the checkpoint (config only) and print what would run; write nothing, queue nothing."),
)


class _CliFormatter(logging.Formatter):
    """`stage-a: warning: ...` lines like the CLI's own messages; debug adds time and logger."""

    def format(self, record: logging.LogRecord) -> str:
        base = f"stage-a: {record.levelname.lower()}: {printable(record.getMessage())}"
        if record.levelno <= logging.DEBUG or logging.getLogger().level <= logging.INFO:
            base = f"{self.formatTime(record)} {record.name}: {base}"
        if record.exc_info and logging.getLogger().level <= logging.DEBUG:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(level: str, debug: bool = False) -> None:
    """The CLI's logging; ``debug`` (--debug) means DEBUG and full tracebacks of errors."""
    if debug:
        level = "DEBUG"
        import cli

        cli.DEBUG = True
    from stage_a.logs import JsonFormatter, wants_json

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if wants_json() else _CliFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


def absolute_path(path: str | None) -> str:
    """``path`` absolute and resolved from this process's cwd, where the operator typed it: workers
    elsewhere would resolve a relative path from their own cwd. Empty stays empty."""
    return str(Path(path).expanduser().resolve()) if path else ""


def build_spec(kw: dict[str, Any], checkpoint: str, data_dir: str, default_reuse: str = "auto") -> RunSpec:
    """Validate options (mission, dataset, numbers) into a RunSpec; input_root is set at registration.
    ``checkpoint`` is recorded absolute. ``data_dir``: the mission data folder (Settings.data_dir; empty: packaged).
    ``default_reuse``: STAGE_A_REUSE, for a run given neither --reuse nor --no-reuse."""
    from stage_a.missions import get_mission, get_profile, resolve_dataset

    if not kw.get("mission"):
        raise UserError("--mission is required")
    mission = get_mission(kw["mission"], data_dir=data_dir)
    get_profile(kw["prompt_profile"], data_dir=data_dir)
    dataset = resolve_dataset(mission, kw.get("dataset"))
    gen = GenerationParams(
        max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"],
        repetition_penalty=kw["repetition_penalty"],
    )
    return RunSpec(
        mission=mission.name, dataset=dataset, input_root="", checkpoint=absolute_path(checkpoint),
        prompt_profile=kw["prompt_profile"], sharding_mode=kw["sharding_mode"], batch_size=kw["batch_size"],
        max_pixels=kw["max_pixels"] or 0, generation=gen, pass_group_number=kw["pass_group_number"],
        fail_group_number=kw["fail_group_number"], sample_seed=kw["sample_seed"],
        verify_inputs=bool(kw.get("verify_inputs")),
        reuse={True: "on", False: "off"}.get(kw.get("reuse"), default_reuse),  # type: ignore[arg-type]
    )


def require_input_dir(path: Path | None) -> Path:
    if path is None:
        raise UserError("--input-dir is required")
    if not path.exists():
        raise UserError(f"input dir not found: {path}")
    if not path.is_dir():
        raise UserError(f"input dir is not a folder: {path}")
    return path


def make_output_dir(path: Path) -> Path:
    """Create the output folder (and parents); a path that cannot be one is a one-line error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {path}: {exc.strerror or exc}") from None
    return path


def require_existing_sqlite(url: str, hint: str) -> None:
    """Commands that read a database never create an empty one as a side effect of a wrong path."""
    from stage_a.store.engine import parse_url

    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        if not Path(parsed.database).is_file():
            raise UserError(f"no results database at {parsed.database} ({hint})")
