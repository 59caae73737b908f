"""Database engines: one per process, SQLite tuned for concurrent writers, schema via Alembic."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError

from stage_a.errors import UserError
from stage_a.secrets import SCHEME, hide_secrets, redact_url, userinfo_end

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Connect timeouts keep a wrong URL from hanging a command.
CONNECT_TIMEOUT_S = 5
SUPPORTED_URLS = "postgresql+psycopg://user@host/db, or sqlite:///path or a plain path"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    # WAL lets readers (status/export) run beside the writer; NORMAL sync is safe with WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _plain_url(url: str) -> str:
    """``url`` in the form SQLAlchemy parses right: a password with ``@`` in it is percent-encoded
    (SQLAlchemy would cut it at the first ``@``), several hosts (libpq's failover list) become
    ``?host=`` parameters, the form SQLAlchemy hands to psycopg."""
    from urllib.parse import quote, unquote

    m = SCHEME.match(url)
    if not m:
        return url
    head, rest = url[:m.end()], url[m.end():]
    at = userinfo_end(rest)
    userinfo, after = (rest[:at], rest[at + 1:]) if at > 0 else ("", rest)
    if "@" in userinfo:
        user, _, password = userinfo.partition(":")
        userinfo = quote(unquote(user), safe="") + ":" + quote(unquote(password), safe="")
    cut = min([i for i in (after.find("/"), after.find("?")) if i >= 0], default=len(after))
    hosts, tail = after[:cut], after[cut:]
    if "," in hosts:
        path, sep, query = tail.partition("?")
        extra = "&".join("host=" + quote(h, safe=":") for h in hosts.split(",") if h)
        tail = path + "?" + (query + "&" if sep and query else "") + extra
        hosts = ""
    return head + (userinfo + "@" if at > 0 else "") + hosts + tail


def parse_url(url: str) -> URL:
    """``url`` parsed by SQLAlchemy (see _plain_url); a malformed one is a UserError, password hidden."""
    try:
        return make_url(_plain_url(url))
    except Exception as exc:
        raise UserError(f"invalid database URL {redact_url(url)}: {hide_secrets(str(exc), url)}") from None


def make_engine(url: str, pool_size: int = 5, sqlite_busy_timeout: float = 30.0) -> Engine:
    """A new engine for ``url``; call after fork, never share one across processes.

    ``pool_size`` caps a process's PostgreSQL connections (no overflow: README's arithmetic is an upper
    bound); ``sqlite_busy_timeout`` is how long a SQLite statement waits for another writer's lock
    before "database is locked" (the store then retries with backoff)."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise UserError(f"database folder does not exist: {folder}")
        engine = create_engine(
            parsed, connect_args={"timeout": sqlite_busy_timeout, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend != "postgresql":  # a typo in the scheme (postgersql://) or another database
        raise UserError(f"unsupported database URL {redact_url(url)}: scheme {parsed.drivername!r} "
                        f"(use {SUPPORTED_URLS})")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=0,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": f"stage-a:{os.getpid()}"},
        )
    except (ImportError, NoSuchModuleError) as exc:  # postgresql+psycopg2:// and no psycopg2 here
        raise UserError(f"unsupported database URL {redact_url(url)}: driver {parsed.drivername!r} is not "
                        f"available ({_first_line(exc)}; use {SUPPORTED_URLS})") from None


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (no-op when current)."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    try:
        with engine.connect() as conn:
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
    except OperationalError as exc:
        url = engine.url.render_as_string(hide_password=False)
        raise UserError(f"cannot connect to database {redact_url(url)}: {hide_secrets(_first_line(exc), url)}") from None

    from alembic import command

    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Many workers may start at once: one migrates, the others wait then see head.
            conn.execute(text("SELECT pg_advisory_xact_lock(7274511)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database schema at revision %s", head)


def _first_line(exc: BaseException) -> str:
    msg = str(getattr(exc, "orig", None) or exc).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def retrying(fn: Callable[[], T], what: str, attempts: int = 8, base_delay: float = 0.5) -> T:
    """Run a DB operation, retrying transient failures (server restart, SQLite lock) with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts or (isinstance(exc, DBAPIError) and not exc.connection_invalidated
                                       and not isinstance(exc, OperationalError)):
                raise
            delay = min(base_delay * 2 ** (attempt - 1), 10.0) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _first_line(exc), attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
