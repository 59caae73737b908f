"""groups: a trigram index over group ids, the search of images still waiting for a result (PostgreSQL)

Revision ID: 0009
Revises: 0008

A search finds an image by its group id, or once it has a result by its summary, error or path
(stage_a.store.search). Unfinished images were searched by path through ix_images_run_status, which
read every unfinished row of the run (0.4-0.6 s at 200,000 unfinished images, growing with the run).
Group ids are one row per group; with pg_trgm (revision 0006 created it where it could) a trigram
index answers a group id or a fragment of one from a few pages.
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql':
        return  # SQLite tests every row of the range it reads
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")).first() is None:
        return  # no extension: search reads the run in output order, as SQLite does
    bind.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_groups_search ON groups USING gin (group_id gin_trgm_ops)"))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP INDEX IF EXISTS ix_groups_search")
