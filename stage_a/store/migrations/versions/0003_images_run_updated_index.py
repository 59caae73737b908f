"""index images (run_id, updated_at): last result, recent rate and first activity without a scan

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_images_run_updated', 'images', ['run_id', 'updated_at'])


def downgrade() -> None:
    op.drop_index('ix_images_run_updated', table_name='images')
