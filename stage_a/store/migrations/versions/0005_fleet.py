"""fleet: store identity, run routing and duplicate keys, worker problems, reclaimer health

Revision ID: 0005
Revises: 0004
"""
import uuid

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        'store_meta',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('key'),
    )
    # Every message names the store it was enqueued in; a worker on another store refuses it.
    op.bulk_insert(meta, [{'key': 'store_id', 'value': uuid.uuid4().hex}])
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('base_model', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('inputs_key', sa.String(length=64), nullable=True))
        batch.create_index('ix_runs_inputs_key', ['inputs_key'])
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('problem', sa.Text(), nullable=True))
    op.create_table(
        'reclaimers',
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('checked_at', sa.DateTime(), nullable=False),
        sa.Column('failing_since', sa.DateTime(), nullable=True),
        sa.Column('problem', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('host'),
    )


def downgrade() -> None:
    op.drop_table('reclaimers')
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('problem')
    with op.batch_alter_table('runs') as batch:
        batch.drop_index('ix_runs_inputs_key')
        batch.drop_column('inputs_key')
        batch.drop_column('base_model')
    op.drop_table('store_meta')
