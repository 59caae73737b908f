"""status check, model/engine per result, run model and cancellation, dead-letter run, worker heartbeats

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images') as batch:
        batch.add_column(sa.Column('model', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('engine', sa.String(length=32), nullable=True))
        batch.create_check_constraint('ck_images_status', "status IN ('pending', 'leased', 'done', 'failed')")
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('model', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('cancelled_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('dead_letters') as batch:
        batch.add_column(sa.Column('run_id', sa.Integer(), nullable=True))
        batch.create_index('ix_dead_letters_run_id', ['run_id'])
    op.create_table(
        'workers',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('model', sa.String(length=255), nullable=True),
        sa.Column('engine', sa.String(length=32), nullable=True),
        sa.Column('device', sa.String(length=64), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('last_batch_at', sa.DateTime(), nullable=True),
        sa.Column('last_batch_images', sa.Integer(), nullable=True),
        sa.Column('last_batch_seconds', sa.Double(), nullable=True),
        sa.Column('images_per_s', sa.Double(), nullable=True),
        sa.Column('tokens_per_s', sa.Double(), nullable=True),
        sa.Column('images_total', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('workers')
    with op.batch_alter_table('dead_letters') as batch:
        batch.drop_index('ix_dead_letters_run_id')
        batch.drop_column('run_id')
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('cancelled_at')
        batch.drop_column('model')
    with op.batch_alter_table('images') as batch:
        batch.drop_constraint('ck_images_status', type_='check')
        batch.drop_column('engine')
        batch.drop_column('model')
