"""images: registering a run writes one index entry per image, not three (partial indexes on PostgreSQL)

Revision ID: 0007
Revises: 0006

Every query by status asks for pending or leased rows (failed ones have ix_images_failed), so finished
rows need no entry: a result write no longer inserts one. (Carrying rel_path, for index-only reads of
unfinished paths by a text search, made registering 10M images ~40% slower: not taken.) Likewise
(run_id, updated_at) holds rows that were written (a lease or a result): a registered row has no
updated_at, and the last-activity read asks for the largest non-null one. SQLite uses a partial index only for queries that
repeat its predicate literally (not for a bound `status = ?`), so there it covers every row.

"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

UNFINISHED = "status IN ('pending', 'leased')"


def upgrade() -> None:
    op.create_index('ix_images_unfinished', 'images', ['run_id', 'status', 'group_position', 'image_index'],
                    postgresql_where=sa.text(UNFINISHED))
    op.drop_index('ix_images_run_status', table_name='images')
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_images_run_updated', table_name='images')
        op.create_index('ix_images_run_updated', 'images', ['run_id', 'updated_at'],
                        postgresql_where=sa.text("updated_at IS NOT NULL"))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_images_run_updated', table_name='images')
        op.create_index('ix_images_run_updated', 'images', ['run_id', 'updated_at'])
    op.create_index('ix_images_run_status', 'images', ['run_id', 'status'])
    op.drop_index('ix_images_unfinished', table_name='images')
