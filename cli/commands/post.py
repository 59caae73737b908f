"""`stage-a postprocess` and `stage-a add-fail-reasons` on an existing Stage-A JSONL."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--dataset", type=click.Choice(["bbu", "rru"]), help="Dataset of the file (informational; clean-up is the same).")
@click.option("--inplace", is_flag=True, help="Rewrite PATH safely (temp file + rename).")
@click.option("--output", type=click.Path(path_type=Path), help="Write the result here instead.")
def postprocess(path: Path, dataset: str | None, inplace: bool, output: Path | None) -> None:
    """Re-apply the summary clean-up to every summary of PATH and re-validate every record."""
    from merger.postprocess import postprocess_file

    report = postprocess_file(path, output=output, inplace=inplace)
    click.echo(f"postprocess: {report.records} records, {report.summaries_changed} summaries changed -> "
               f"{path if inplace else output}")


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--excel", "excel", required=True, type=click.Path(path_type=Path), help=".xlsx: A=group_id, C=mission, F=reason, G=pass flag (2=fail); no header row.")
@click.option("--dataset", type=click.Choice(["bbu", "rru"]), default="bbu", show_default=True, help="Dataset of the file (RRU is not supported).")
@click.option("--inplace", is_flag=True, help="Rewrite PATH safely (temp file + rename).")
@click.option("--output", type=click.Path(path_type=Path), help="Write the result here instead.")
def add_fail_reasons(path: Path, excel: Path, dataset: str, inplace: bool, output: Path | None) -> None:
    """Attach gt_fail_reason_texts / gt_fail_reason_text to the fail records of PATH."""
    from merger.fail_reasons import add_fail_reasons_file
    from stage_a.settings import Settings

    report = add_fail_reasons_file(path, excel, dataset, output=output, inplace=inplace,
                                   data_dir=Settings.from_env().data_dir)
    click.echo(f"add-fail-reasons: {report.updated} records updated; {report.fail_without_reason} of "
               f"{report.fail_records} fail records had no reason")
