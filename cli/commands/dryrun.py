"""`--dry-run` of `run` and `enqueue`: what would run, checked as far as possible, with nothing written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from producer.register import Plan
from stage_a.errors import first_line
from stage_a.settings import Settings
from stage_a.terminal import printable


def input_root_note(root: str, settings: Settings) -> str:
    """Whether this process can read the root, and whether farm workers may (STAGE_A_INPUT_ROOTS)."""
    here = "readable here" if os.access(root, os.R_OK | os.X_OK) else "NOT readable by this process"
    if not settings.input_roots:
        return f"{here}; workers read it at the same path (STAGE_A_INPUT_ROOTS unset: any root allowed)"
    real = os.path.realpath(root)
    for r in settings.input_roots:
        rr = os.path.realpath(r)
        if os.path.commonpath([rr, real]) == rr:
            return f"{here}; workers may read it: under STAGE_A_INPUT_ROOTS entry {r}"
    return f"{here}; workers will REFUSE it: outside STAGE_A_INPUT_ROOTS ({os.pathsep.join(settings.input_roots)})"


def checkpoint_note(checkpoint: str, settings: Settings) -> str:
    """Load the checkpoint's config (weights only hashed): the model type and identity, or why it would not load."""
    if not checkpoint:
        return "none: the tiny random-weight demo model (meaningless summaries)"
    from stage_a.checkpoint import Checkpoint
    from stage_a.errors import UserError

    try:
        ckpt = Checkpoint.open(checkpoint, settings.cache_path / "identity")
    except UserError as exc:
        return f"{checkpoint}: WILL NOT LOAD: {exc}"
    kind = _config_note(ckpt.base)
    if ckpt.adapter:
        kind = f"LoRA adapter on {ckpt.base}; base {kind}"
    return f"{checkpoint}: model {ckpt.identity}, {kind}"


def _config_note(path: Path) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        return f"config does NOT load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
    return f"config loads (model_type {config.model_type}, {arch})"


def print_plan(plan: Plan, checkpoint: str, settings: Settings, target: str) -> None:
    """The dry run's report on stdout."""
    spec = plan.spec
    labels = plan.by_label()
    click.echo("stage-a: dry run: nothing written, nothing queued")
    click.echo(f"  mission:     {spec.mission} (dataset {spec.dataset}, prompt {spec.prompt_profile})")
    click.echo(f"  input root:  {spec.input_root} ({input_root_note(spec.input_root, settings)})")
    for label in ("fail", "pass"):
        groups, images = labels.get(label, (0, 0))
        click.echo(f"  {label}:        {groups} groups, {images} images")
    click.echo(f"  total:       {len(plan.groups)} groups ({plan.discovered_groups} found), {plan.images} images")
    for w in plan.warnings:
        click.echo(f"  warning:     {printable(w)}")
    click.echo(f"  checkpoint:  {checkpoint_note(checkpoint, settings)}")
    gen = spec.generation
    click.echo(f"  generation:  batch_size {spec.batch_size}, max_pixels {spec.max_pixels}, max_new_tokens "
               f"{gen.max_new_tokens}, temperature {gen.temperature}, top_p {gen.top_p}, repetition_penalty "
               f"{gen.repetition_penalty}, sharding {spec.sharding_mode}")
    click.echo(f"  {target}")


def database_problem(url: str) -> list[str]:
    """[why] when the database at ``url`` does not answer (connects once, writes nothing), else []."""
    from stage_a.secrets import redact_url
    from stage_a.store.engine import make_engine

    try:
        engine = make_engine(url, pool_size=1)
    except Exception as exc:
        return [f"database {redact_url(url)}: {first_line(exc)}"]
    try:
        with engine.connect():
            return []
    except Exception as exc:
        return [f"database {redact_url(url)} NOT reachable ({first_line(exc)[:200]})"]
    finally:
        engine.dispose()


def fail_dry_run(problems: list[str]) -> None:
    """After the plan: exit 2 with one line naming the first reason the real command would fail."""
    if not problems:
        return
    more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
    click.echo(f"stage-a: error: the real command would fail: {printable(problems[0])}{more}", err=True)
    sys.exit(2)
