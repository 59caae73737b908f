"""Alembic environment: the store passes its own connection in `config.attributes`."""

from alembic import context

from stage_a.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite needs batch mode for ALTERs
)
with context.begin_transaction():
    context.run_migrations()
