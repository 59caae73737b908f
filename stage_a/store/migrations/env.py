"""Alembic environment.

The store passes its own connection in `config.attributes["connection"]`. Run by hand
(`alembic revision --autogenerate -m ...` from the repository root, alembic.ini), it connects to
STAGE_A_DATABASE_URL, or to a scratch SQLite file brought to head first.
"""

from alembic import context
from sqlalchemy import create_engine

from stage_a.store.models import Base

connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    from stage_a.settings import Settings

    url = Settings.from_env().database_url or context.config.get_main_option("sqlalchemy.url") or ""
    with create_engine(url).connect() as conn:
        # render_as_batch: SQLite needs batch mode for ALTERs.
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()
