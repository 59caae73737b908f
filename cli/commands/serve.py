"""`stage-a serve`: the read-only web app over the results store (monitor.web)."""

from __future__ import annotations

import click

from cli.commands.status import DB_HELP, open_store


@click.command()
@click.option("--db", help=DB_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for all interfaces: set STAGE_A_SERVE_BASIC_AUTH then).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, help="uvicorn's log level.")
def serve(db: str | None, host: str, port: int, log_level: str) -> None:
    """Web pages of the runs in the results store: runs, a run's progress, workers, failures and every image
    beside its summary (filters, pages), diffs of two runs; /api/runs[/RUN] (the `status --json` object),
    Prometheus /metrics and /healthz. Read-only. HTTP basic auth when STAGE_A_SERVE_BASIC_AUTH=user:password."""
    import uvicorn

    from monitor.web.app import create_app
    from stage_a.settings import Settings

    settings = Settings.from_env()
    store = open_store(db, settings)
    click.echo(f"stage-a serve: {store.display_url} on http://{host}:{port}/"
               + (" (basic auth)" if settings.serve_basic_auth else ""), err=True)
    uvicorn.run(create_app(store, settings), host=host, port=port, log_level=log_level.lower(),
                proxy_headers=True, server_header=False)
