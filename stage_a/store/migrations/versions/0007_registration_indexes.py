"""images: registering a run writes fewer index entries and checks no foreign key per row (PostgreSQL)

Revision ID: 0007
Revises: 0006

- (run_id, status) becomes (run_id, status, group_position, image_index): a run's rows of one status in
  output order (publishing, leases, the search of unfinished paths). Not partial: a generic plan's
  `status = $1` (a prepared statement) does not prove a partial index's predicate, nor does SQLite's `?`.
- (run_id, updated_at) holds written rows only on PostgreSQL (a registered row has no updated_at; the
  last-activity read asks for the largest non-null one): registration inserts nothing there.
- PostgreSQL drops the images -> groups foreign key: its check is a trigger per inserted row, ~45% of
  registering a run (1M images: 13.3 s with it, 7.2 s without). Rows are only ever inserted with their
  group by create_run, in one transaction; deleting groups (a run deleted by hand: runs -> groups
  cascades) deletes their images by one statement-level trigger, as the cascade did. SQLite keeps the
  foreign key (a farm never runs on SQLite).
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

CASCADE_FUNCTION = """
CREATE FUNCTION stage_a_groups_delete_images() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM images i USING old_rows g WHERE i.run_id = g.run_id AND i.group_position = g.position;
    RETURN NULL;
END $$"""


def upgrade() -> None:
    op.drop_index('ix_images_run_status', table_name='images')
    op.create_index('ix_images_run_status', 'images', ['run_id', 'status', 'group_position', 'image_index'])
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_images_run_updated', table_name='images')
        op.create_index('ix_images_run_updated', 'images', ['run_id', 'updated_at'],
                        postgresql_where=sa.text("updated_at IS NOT NULL"))
        op.drop_constraint('images_run_id_group_position_fkey', 'images', type_='foreignkey')
        op.execute(CASCADE_FUNCTION)
        op.execute("CREATE TRIGGER groups_delete_images AFTER DELETE ON groups REFERENCING OLD TABLE AS old_rows "
                   "FOR EACH STATEMENT EXECUTE FUNCTION stage_a_groups_delete_images()")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS groups_delete_images ON groups")
        op.execute("DROP FUNCTION IF EXISTS stage_a_groups_delete_images()")
        op.create_foreign_key('images_run_id_group_position_fkey', 'images', 'groups',
                              ['run_id', 'group_position'], ['run_id', 'position'], ondelete='CASCADE')
        op.drop_index('ix_images_run_updated', table_name='images')
        op.create_index('ix_images_run_updated', 'images', ['run_id', 'updated_at'])
    op.drop_index('ix_images_run_status', table_name='images')
    op.create_index('ix_images_run_status', 'images', ['run_id', 'status'])
