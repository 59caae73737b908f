"""Fresh PostgreSQL databases on the real server for tests, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

PG_ADMIN_URL = os.environ.get("STAGE_A_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_database(prefix: str = "stage_a_test") -> Iterator[str]:
    """The URL of a new, empty database; dropped (connections and all) on exit."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # CI starts PostgreSQL; say why if it is not there
        admin.dispose()
        raise RuntimeError(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}") from exc
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class RoleDatabase:
    """A fresh database owned by its own login role (not a superuser): ``url`` connects as that role,
    ``admin_url`` as the superuser. ``block()`` is PostgreSQL out of connections for the role (CONNECTION
    LIMIT 0, its open connections terminated): every connect then fails with "too many connections for
    role"; ``unblock()`` ends it."""

    url: str
    admin_url: str
    role: str
    _admin: Any

    def block(self) -> None:
        from sqlalchemy import text

        with self._admin.connect() as c:
            c.execute(text(f'ALTER ROLE "{self.role}" CONNECTION LIMIT 0'))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                      {"r": self.role})

    def unblock(self) -> None:
        from sqlalchemy import text

        with self._admin.connect() as c:
            c.execute(text(f'ALTER ROLE "{self.role}" CONNECTION LIMIT -1'))


@contextmanager
def pg_role_database(prefix: str = "stage_a_role") -> Iterator[RoleDatabase]:
    """A RoleDatabase; database and role dropped on exit."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    with admin.connect() as c:
        c.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        c.execute(text(f'CREATE DATABASE "{name}" OWNER "{name}"'))
    try:
        yield RoleDatabase(base.replace("postgres@", f"{name}@", 1) + f"/{name}", base + f"/{name}", name, admin)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()
