"""`stage-a serve`: the read-only web app over the results store (monitor.web)."""

from __future__ import annotations

import errno
import socket

import click

from cli.commands.status import DB_HELP, open_store
from stage_a.errors import UserError


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
    sock = listen(host, port)  # before uvicorn: a busy port is one line and exit 2, not a startup then exit 3
    click.echo(f"stage-a serve: {store.display_url} on http://{host}:{port}/"
               + (" (basic auth)" if settings.serve_basic_auth else ""), err=True)
    config = uvicorn.Config(create_app(store, settings), host=host, port=port, log_level=log_level.lower(),
                            proxy_headers=True, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError saying why not (port in use, bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = " (another process listens there: pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.set_inheritable(True)
    return sock
