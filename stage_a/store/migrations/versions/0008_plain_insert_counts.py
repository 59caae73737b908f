"""images: registered rows move only the pending counter, in one pass (PostgreSQL)

Revision ID: 0008
Revises: 0007

A run is registered by COPYing its images as pending rows carrying no result. The INSERT statement
trigger of revision 0006 read each COPY's transition table eight times to learn that only `pending`
moves (~30% of registering a run). It now first checks that every new row is such a plain pending row
and then adds their count per run; any other insert takes the general path, unchanged.
"""
import importlib

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_COUNTERS = importlib.import_module("stage_a.store.migrations.versions.0006_scale_and_reuse")

_RESULT_COLUMNS = ("updated_at", "worker", "preprocess_ms", "generate_ms", "completion_tokens", "prompt_tokens",
                   "model", "engine", "reused_from")
"""Columns a registered row leaves NULL: a row setting any of them may move more than `pending`."""

PLAIN_INSERT = f"""
  -- Registration: every new row pending with no result moves `pending` only (one pass to check, one to add).
  IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status IS DISTINCT FROM 'pending'
                 OR {" OR ".join(f"{c} IS NOT NULL" for c in _RESULT_COLUMNS)}) THEN
    INSERT INTO run_counts (run_id, pending) SELECT run_id, COUNT(*) FROM new_rows GROUP BY run_id ORDER BY run_id
      ON CONFLICT (run_id) DO UPDATE SET pending = run_counts.pending + excluded.pending;
    RETURN NULL;
  END IF;"""


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_COUNTERS._pg_function("INSERT", PLAIN_INSERT))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_COUNTERS._pg_function("INSERT"))
