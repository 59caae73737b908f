"""scale and reuse: per-run counters kept by triggers; reused summaries

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# ---- counters (issue 20) -------------------------------------------------------------------------
# Every write of an images row updates its run's counters in the same statement's transaction, by
# trigger: no write path can forget them and no crash can separate a result from its count.
# PostgreSQL: statement-level triggers with transition tables (one set-based update per statement,
# whatever its size); SQLite: row-level triggers. The views read run_counts, never the images.

_FINISHED = "('done', 'failed')"
_BUCKET_S = 10
"""Seconds per run_recent bucket: the recent rate's window is read from these."""


def _is(side: str, status: str) -> str:
    return f"(CASE WHEN {side}.status = '{status}' THEN 1 ELSE 0 END)"


def _num(side: str, col: str) -> str:
    return f"COALESCE({side}.{col}, 0)"


def _has(side: str, col: str) -> str:
    return f"(CASE WHEN {side}.{col} IS NOT NULL THEN 1 ELSE 0 END)"


def _gen_tok(side: str) -> str:
    return f"(CASE WHEN {side}.completion_tokens IS NOT NULL THEN COALESCE({side}.generate_ms, 0) ELSE 0 END)"


def _reused(side: str) -> str:
    return f"(CASE WHEN {side}.status = 'done' AND {side}.reused_from IS NOT NULL THEN 1 ELSE 0 END)"


_COUNTED = ("status", "preprocess_ms", "generate_ms", "completion_tokens", "prompt_tokens", "model", "engine",
            "reused_from")
"""Columns whose change moves a counter (updated_at and worker move times and names only)."""

# (run_counts column, the row's contribution given its alias); a write moves a counter by the new
# row's contribution minus the old row's (a missing side is all NULL: contributes nothing).
_TERMS = (
    ("pending", lambda s: _is(s, 'pending')),
    ("leased", lambda s: _is(s, 'leased')),
    ("done", lambda s: _is(s, 'done')),
    ("failed", lambda s: _is(s, 'failed')),
    ("reused", _reused),
    ("preprocess_ms_sum", lambda s: _num(s, 'preprocess_ms')),
    ("preprocess_n", lambda s: _has(s, 'preprocess_ms')),
    ("generate_ms_sum", lambda s: _num(s, 'generate_ms')),
    ("generate_n", lambda s: _has(s, 'generate_ms')),
    ("completion_tokens", lambda s: _num(s, 'completion_tokens')),
    ("prompt_tokens", lambda s: _num(s, 'prompt_tokens')),
    ("generate_ms_with_tokens", _gen_tok),
)
_DELTAS = tuple((col, f"{term('n')} - {term('o')}") for col, term in _TERMS)


def _changed() -> str:
    return " OR ".join(f"n.{c} IS DISTINCT FROM o.{c}" for c in _COUNTED)


def _pg_pairs(op_name: str) -> str:
    """The (o, n) row pairs of one statement: a missing side joins as an all-NULL images row."""
    keys = "n.run_id = o.run_id AND n.group_position = o.group_position AND n.image_index = o.image_index"
    if op_name == "INSERT":
        return "new_rows n LEFT JOIN images o ON false"
    if op_name == "DELETE":
        return "old_rows o LEFT JOIN images n ON false"
    return f"new_rows n JOIN old_rows o ON {keys}"


def _pg_function(op_name: str, plain_insert: str = "") -> str:
    """The statement trigger function of ``op_name``; ``plain_insert``: statements that open the INSERT
    function's body (revision 0008's shortcut for registered rows)."""
    pairs = _pg_pairs(op_name)
    run = "COALESCE(n.run_id, o.run_id)"
    pos = "COALESCE(n.group_position, o.group_position)"
    sums = ", ".join(f"SUM({expr}) AS {col}" for col, expr in _DELTAS)
    sets = ", ".join(f"{col} = rc.{col} + d.{col}" for col, _ in _DELTAS)
    # A result arrives when a row turns done or failed (the recent rate counts these); any write of a
    # result, a failed row failing again included, moves last_result.
    finished_new = f"n.status IN {_FINISHED} AND n.status IS DISTINCT FROM o.status"
    result_write = f"n.status IN {_FINISHED} AND (n.status IS DISTINCT FROM o.status OR n.updated_at IS DISTINCT FROM o.updated_at)"
    bucket = (f"date_trunc('minute', n.updated_at) + floor(extract(second from n.updated_at) / {_BUCKET_S})"
              f" * interval '{_BUCKET_S} seconds'")
    model_delta = (
        "SELECT n.run_id AS run_id, COALESCE(n.model, '') AS model, COALESCE(n.engine, '') AS engine, 1 AS d "
        f"FROM {pairs} WHERE n.status = 'done' AND (o.status IS DISTINCT FROM 'done' "
        "OR o.model IS DISTINCT FROM n.model OR o.engine IS DISTINCT FROM n.engine) "
        "UNION ALL "
        "SELECT o.run_id, COALESCE(o.model, ''), COALESCE(o.engine, ''), -1 "
        f"FROM {pairs} WHERE o.status = 'done' AND (n.status IS DISTINCT FROM 'done' "
        "OR o.model IS DISTINCT FROM n.model OR o.engine IS DISTINCT FROM n.engine)"
    )
    ensure = ("INSERT INTO run_counts (run_id) SELECT DISTINCT run_id FROM new_rows ON CONFLICT (run_id) DO NOTHING;"
              if op_name == "INSERT" else "")
    return f"""
CREATE OR REPLACE FUNCTION stage_a_images_{op_name.lower()}_counts() RETURNS trigger LANGUAGE plpgsql
  -- The results' bulk UPDATE turns hash and merge joins off for its transaction; the transition
  -- tables are joined here and need them (restored when the function returns).
  SET enable_hashjoin = on SET enable_mergejoin = on AS $$
BEGIN{plain_insert}
  {ensure}
  -- Lock the counter rows first, in run order: every other lock this statement takes on a run's
  -- groups and models is taken under it, so concurrent writers of one run cannot deadlock.
  PERFORM 1 FROM run_counts WHERE run_id IN (
      SELECT DISTINCT {run} FROM {pairs} WHERE {_changed()}
        OR (n.updated_at IS DISTINCT FROM o.updated_at)
        OR (n.worker IS NOT NULL AND n.worker IS DISTINCT FROM o.worker))
    ORDER BY run_id FOR UPDATE;

  UPDATE run_counts rc SET {sets},
      first_activity = LEAST(rc.first_activity, d.first_activity),
      first_result = LEAST(rc.first_result, d.first_result),
      last_result = GREATEST(rc.last_result, d.last_result)
    FROM (SELECT {run} AS run_id, {sums},
                 MIN(n.updated_at) FILTER (WHERE n.updated_at IS DISTINCT FROM o.updated_at) AS first_activity,
                 MIN(n.updated_at) FILTER (WHERE {finished_new}) AS first_result,
                 MAX(n.updated_at) FILTER (WHERE {result_write}) AS last_result,
                 BOOL_OR({_changed()}) AS changed
          FROM {pairs} GROUP BY 1) d
    WHERE rc.run_id = d.run_id AND (d.changed OR d.last_result IS NOT NULL
      OR (d.first_activity IS NOT NULL AND (rc.first_activity IS NULL OR d.first_activity < rc.first_activity)));

  WITH g AS (
      SELECT {run} AS run_id, {pos} AS pos,
             SUM({_is('n', 'done')} - {_is('o', 'done')}) AS dd,
             SUM({_is('n', 'failed')} - {_is('o', 'failed')}) AS df
      FROM {pairs} WHERE n.status IS DISTINCT FROM o.status GROUP BY 1, 2),
    u AS (
      UPDATE groups gr SET n_done = gr.n_done + g.dd, n_failed = gr.n_failed + g.df FROM g
      WHERE gr.run_id = g.run_id AND gr.position = g.pos AND (g.dd <> 0 OR g.df <> 0)
      RETURNING gr.run_id, gr.n_images, gr.n_done, gr.n_failed, g.dd, g.df),
    x AS (
      SELECT run_id,
             SUM(CASE WHEN n_done = n_images THEN 1 ELSE 0 END - CASE WHEN n_done - dd = n_images THEN 1 ELSE 0 END) AS gd,
             SUM(CASE WHEN n_failed > 0 THEN 1 ELSE 0 END - CASE WHEN n_failed - df > 0 THEN 1 ELSE 0 END) AS gf
      FROM u GROUP BY run_id)
  UPDATE run_counts rc SET groups_done = rc.groups_done + x.gd, groups_failed = rc.groups_failed + x.gf
    FROM x WHERE rc.run_id = x.run_id AND (x.gd <> 0 OR x.gf <> 0);

  INSERT INTO run_models (run_id, model, engine, images)
    SELECT run_id, model, engine, SUM(d) FROM ({model_delta}) t
    WHERE EXISTS (SELECT 1 FROM run_counts rc WHERE rc.run_id = t.run_id)
    GROUP BY 1, 2, 3 HAVING SUM(d) <> 0
    ON CONFLICT (run_id, model, engine) DO UPDATE SET images = run_models.images + excluded.images;

  INSERT INTO run_recent (run_id, bucket, finished)
    SELECT n.run_id, {bucket}, COUNT(*) FROM {pairs} WHERE {finished_new} AND n.updated_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM run_counts rc WHERE rc.run_id = n.run_id) GROUP BY 1, 2
    ON CONFLICT (run_id, bucket) DO UPDATE SET finished = run_recent.finished + excluded.finished;

  INSERT INTO run_workers (run_id, worker)
    SELECT DISTINCT n.run_id, n.worker FROM {pairs}
    WHERE n.worker IS NOT NULL AND n.worker IS DISTINCT FROM o.worker
      AND EXISTS (SELECT 1 FROM run_counts rc WHERE rc.run_id = n.run_id)
    ON CONFLICT DO NOTHING;
  RETURN NULL;
END $$;
"""


def _pg_groups_function() -> str:
    # A group of no images is complete from the start (as a count of its unfinished images says).
    return """
CREATE OR REPLACE FUNCTION stage_a_groups_insert_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO run_counts (run_id, groups_done)
    SELECT run_id, SUM(CASE WHEN n_images = n_done THEN 1 ELSE 0 END) FROM new_rows GROUP BY run_id
    ON CONFLICT (run_id) DO UPDATE SET groups_done = run_counts.groups_done + excluded.groups_done;
  RETURN NULL;
END $$;
"""


def _sqlite_triggers() -> list[str]:
    """Row-level triggers with the same arithmetic (NULL-safe; SQLite's two-argument min/max return
    NULL when either side is NULL, hence the COALESCEs)."""
    bucket = f"substr(new.updated_at, 1, 17) || printf('%02d', (CAST(substr(new.updated_at, 18, 2) AS INTEGER) / {_BUCKET_S}) * {_BUCKET_S}) || '.000000'"
    out = []
    for op_name in ("INSERT", "UPDATE", "DELETE"):
        n = "new" if op_name != "DELETE" else None
        o = "old" if op_name != "INSERT" else None

        def expr(e: str, n: str | None = n, o: str | None = o) -> str:
            # A missing side: its columns read as NULL.
            for side, alias in (("n", n), ("o", o)):
                for col in ("status", "preprocess_ms", "generate_ms", "completion_tokens", "prompt_tokens",
                            "reused_from", "updated_at", "model", "engine", "worker"):
                    e = e.replace(f"{side}.{col}", f"{alias}.{col}" if alias else "NULL")
            return e.replace("IS DISTINCT FROM", "IS NOT")

        run = "new.run_id" if n else "old.run_id"
        pos = "new.group_position" if n else "old.group_position"
        sets = ", ".join(f"{col} = {col} + ({expr(e)})" for col, e in _DELTAS)
        finished_new = expr(f"(n.status IN {_FINISHED} AND n.status IS DISTINCT FROM o.status)")
        result_write = expr(f"(n.status IN {_FINISHED} AND (n.status IS DISTINCT FROM o.status "
                            "OR n.updated_at IS DISTINCT FROM o.updated_at))")
        new_at = expr("n.updated_at")
        act = expr("n.updated_at IS NOT NULL AND n.updated_at IS DISTINCT FROM o.updated_at")
        done_d, failed_d = expr(f"{_is('n', 'done')} - {_is('o', 'done')}"), expr(f"{_is('n', 'failed')} - {_is('o', 'failed')}")
        where_group = f"run_id = {run} AND position = {pos}"
        group_done = f"(SELECT CASE WHEN n_done = n_images THEN 1 ELSE 0 END FROM groups WHERE {where_group})"
        group_failed = f"(SELECT CASE WHEN n_failed > 0 THEN 1 ELSE 0 END FROM groups WHERE {where_group})"
        status_moved = expr("n.status IS DISTINCT FROM o.status")
        model_in = expr("n.status = 'done' AND (o.status IS DISTINCT FROM 'done' OR o.model IS DISTINCT FROM n.model "
                        "OR o.engine IS DISTINCT FROM n.engine)")
        model_out = expr("o.status = 'done' AND (n.status IS DISTINCT FROM 'done' OR o.model IS DISTINCT FROM n.model "
                         "OR o.engine IS DISTINCT FROM n.engine)")
        body = []
        if op_name == "INSERT":
            body.append("INSERT INTO run_counts (run_id) VALUES (new.run_id) ON CONFLICT (run_id) DO NOTHING;")
        body.append(f"UPDATE run_counts SET {sets}, "
                    f"first_activity = CASE WHEN {act} THEN MIN(COALESCE(first_activity, {new_at}), {new_at}) ELSE first_activity END, "
                    f"first_result = CASE WHEN {finished_new} THEN MIN(COALESCE(first_result, {new_at}), {new_at}) ELSE first_result END, "
                    f"last_result = CASE WHEN {result_write} THEN MAX(COALESCE(last_result, {new_at}), {new_at}) ELSE last_result END "
                    f"WHERE run_id = {run};")
        # Group transitions: take the group's old standing out, move it, put its new standing in.
        body.append(f"UPDATE run_counts SET groups_done = groups_done - {group_done}, groups_failed = groups_failed - {group_failed} "
                    f"WHERE run_id = {run} AND {status_moved};")
        body.append(f"UPDATE groups SET n_done = n_done + ({done_d}), n_failed = n_failed + ({failed_d}) "
                    f"WHERE {where_group} AND {status_moved};")
        body.append(f"UPDATE run_counts SET groups_done = groups_done + {group_done}, groups_failed = groups_failed + {group_failed} "
                    f"WHERE run_id = {run} AND {status_moved};")
        if n:
            body.append("INSERT INTO run_models (run_id, model, engine, images) "
                        f"SELECT new.run_id, COALESCE(new.model, ''), COALESCE(new.engine, ''), 1 WHERE {model_in} "
                        "ON CONFLICT (run_id, model, engine) DO UPDATE SET images = images + 1;")
            body.append(f"INSERT INTO run_recent (run_id, bucket, finished) SELECT new.run_id, {bucket}, 1 WHERE {finished_new} AND new.updated_at IS NOT NULL "
                        "ON CONFLICT (run_id, bucket) DO UPDATE SET finished = finished + 1;")
            body.append("INSERT INTO run_workers (run_id, worker) SELECT new.run_id, new.worker "
                        f"WHERE {expr('n.worker IS NOT NULL AND n.worker IS DISTINCT FROM o.worker')} "
                        "ON CONFLICT DO NOTHING;")
        if o:
            body.append(f"UPDATE run_models SET images = images - 1 WHERE run_id = old.run_id "
                        f"AND model = COALESCE(old.model, '') AND engine = COALESCE(old.engine, '') AND {model_out};")
        when = ""
        if op_name == "UPDATE":
            cols = (*_COUNTED, "updated_at", "worker")
            when = "WHEN " + " OR ".join(f"old.{c} IS NOT new.{c}" for c in cols)
        out.append(f"CREATE TRIGGER images_{op_name.lower()}_counts AFTER {op_name} ON images FOR EACH ROW {when}\n"
                   f"BEGIN\n  " + "\n  ".join(body) + "\nEND;")
    out.append("CREATE TRIGGER groups_insert_counts AFTER INSERT ON groups FOR EACH ROW BEGIN\n"
               "  INSERT INTO run_counts (run_id, groups_done) VALUES (new.run_id, CASE WHEN new.n_images = new.n_done THEN 1 ELSE 0 END)\n"
               "  ON CONFLICT (run_id) DO UPDATE SET groups_done = groups_done + excluded.groups_done;\nEND;")
    return out


def _counters_upgrade() -> None:
    big = sa.BigInteger()
    op.create_table(
        'run_counts',
        sa.Column('run_id', sa.Integer(), nullable=False),
        *(sa.Column(c, big, nullable=False, server_default='0')
          for c in ('pending', 'leased', 'done', 'failed', 'reused', 'groups_done', 'groups_failed',
                    'preprocess_n', 'generate_n', 'completion_tokens', 'prompt_tokens')),
        *(sa.Column(c, sa.Float(), nullable=False, server_default='0')
          for c in ('preprocess_ms_sum', 'generate_ms_sum', 'generate_ms_with_tokens')),
        sa.Column('first_activity', sa.DateTime(), nullable=True),
        sa.Column('first_result', sa.DateTime(), nullable=True),
        sa.Column('last_result', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id'),
    )
    op.create_table(
        'run_models',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=255), nullable=False),
        sa.Column('engine', sa.String(length=32), nullable=False),
        sa.Column('images', big, nullable=False, server_default='0'),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'model', 'engine'),
    )
    op.create_table(
        'run_recent',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('bucket', sa.DateTime(), nullable=False),
        sa.Column('finished', big, nullable=False, server_default='0'),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'bucket'),
    )
    op.create_table(
        'run_workers',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'worker'),
    )
    with op.batch_alter_table('groups') as batch:
        batch.add_column(sa.Column('n_done', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('n_failed', sa.Integer(), nullable=False, server_default='0'))
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        for op_name in ("INSERT", "UPDATE", "DELETE"):
            op.execute(_pg_function(op_name))
            refs = {"INSERT": "NEW TABLE AS new_rows", "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
                    "DELETE": "OLD TABLE AS old_rows"}[op_name]
            op.execute(f"CREATE TRIGGER images_{op_name.lower()}_counts AFTER {op_name} ON images "
                       f"REFERENCING {refs} FOR EACH STATEMENT "
                       f"EXECUTE FUNCTION stage_a_images_{op_name.lower()}_counts()")
        op.execute(_pg_groups_function())
        op.execute("CREATE TRIGGER groups_insert_counts AFTER INSERT ON groups REFERENCING NEW TABLE AS new_rows "
                   "FOR EACH STATEMENT EXECUTE FUNCTION stage_a_groups_insert_counts()")
    else:
        for stmt in _sqlite_triggers():
            op.execute(stmt)
    _backfill(bind)


def _backfill(bind: sa.engine.Connection) -> None:
    """Counters of the runs recorded before this revision, from one full count (once, at upgrade)."""
    bind.execute(sa.text(
        "UPDATE groups SET n_done = (SELECT COUNT(*) FROM images i WHERE i.run_id = groups.run_id "
        "AND i.group_position = groups.position AND i.status = 'done'), "
        "n_failed = (SELECT COUNT(*) FROM images i WHERE i.run_id = groups.run_id "
        "AND i.group_position = groups.position AND i.status = 'failed') "
        "WHERE EXISTS (SELECT 1 FROM images i WHERE i.run_id = groups.run_id AND i.group_position = groups.position "
        "AND i.status IN ('done', 'failed'))"))
    cols = [c for c, _ in _TERMS]
    exprs = [term("i") for _, term in _TERMS]
    bind.execute(sa.text(
        f"INSERT INTO run_counts (run_id, {', '.join(cols)}, first_activity, first_result, last_result, groups_done, groups_failed) "
        f"SELECT r.id, {', '.join(f'COALESCE((SELECT SUM({e}) FROM images i WHERE i.run_id = r.id), 0)' for e in exprs)}, "
        "(SELECT MIN(updated_at) FROM images i WHERE i.run_id = r.id), "
        f"(SELECT MIN(updated_at) FROM images i WHERE i.run_id = r.id AND i.status IN {_FINISHED}), "
        f"(SELECT MAX(updated_at) FROM images i WHERE i.run_id = r.id AND i.status IN {_FINISHED}), "
        "(SELECT COUNT(*) FROM groups g WHERE g.run_id = r.id AND g.n_done = g.n_images), "
        "(SELECT COUNT(*) FROM groups g WHERE g.run_id = r.id AND g.n_failed > 0) "
        "FROM runs r"))
    bind.execute(sa.text(
        "INSERT INTO run_models (run_id, model, engine, images) SELECT run_id, COALESCE(model, ''), COALESCE(engine, ''), "
        "COUNT(*) FROM images WHERE status = 'done' GROUP BY run_id, COALESCE(model, ''), COALESCE(engine, '')"))
    bind.execute(sa.text(
        "INSERT INTO run_workers (run_id, worker) SELECT DISTINCT run_id, worker FROM images WHERE worker IS NOT NULL"))


def _counters_downgrade() -> None:
    bind = op.get_bind()
    for op_name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS images_{op_name}_counts" + (" ON images" if bind.dialect.name == 'postgresql' else ""))
    op.execute("DROP TRIGGER IF EXISTS groups_insert_counts" + (" ON groups" if bind.dialect.name == 'postgresql' else ""))
    if bind.dialect.name == 'postgresql':
        for op_name in ("insert", "update", "delete"):
            op.execute(f"DROP FUNCTION IF EXISTS stage_a_images_{op_name}_counts()")
        op.execute("DROP FUNCTION IF EXISTS stage_a_groups_insert_counts()")
    with op.batch_alter_table('groups') as batch:
        batch.drop_column('n_failed')
        batch.drop_column('n_done')
    for table in ('run_workers', 'run_recent', 'run_models', 'run_counts'):
        op.drop_table(table)


# ---- reuse (issue 21) ----------------------------------------------------------------------------


def _reuse_upgrade() -> None:
    # reuse_key: on generated done rows (the one row that carries a key's summary); stat_key: on the row
    # that first recorded a file's stat signature; reused_from: the run that generated a reused summary.
    with op.batch_alter_table('images') as batch:
        batch.add_column(sa.Column('reuse_key', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('reused_from', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('stat_key', sa.String(length=64), nullable=True))
    for name, cols, where in (('ix_images_reuse_key', ['reuse_key'], "reuse_key IS NOT NULL"),
                              ('ix_images_stat_key', ['stat_key'], "stat_key IS NOT NULL"),
                              ('ix_images_reused_from', ['run_id', 'reused_from'], "reused_from IS NOT NULL")):
        op.create_index(name, 'images', cols, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


def _reuse_downgrade() -> None:
    for name in ('ix_images_reused_from', 'ix_images_stat_key', 'ix_images_reuse_key'):
        op.drop_index(name, table_name='images')
    with op.batch_alter_table('images') as batch:
        batch.drop_column('stat_key')
        batch.drop_column('reused_from')
        batch.drop_column('reuse_key')


# ---- search and pages (issue 20) -----------------------------------------------------------------


# Keyset pages of a run in output order under each filter: failed rows and 无关图片 rows by partial
# indexes in position order, groups by label; text search by a trigram index (PostgreSQL's pg_trgm)
# over the one expression the page searches in finished rows (stage_a.store.search.search_text).

SEARCH_TEXT = "(COALESCE(summary, '') || ' ' || COALESCE(error, '') || ' ' || rel_path)"
"""The text a search matches (search.search_text builds the same expression, so the index serves it)."""
FINISHED_ROW = "status IN ('done', 'failed')"


def _search_upgrade() -> None:
    op.create_index('ix_images_failed', 'images', ['run_id', 'group_position', 'image_index'],
                    postgresql_where=sa.text("status = 'failed'"), sqlite_where=sa.text("status = 'failed'"))
    op.create_index('ix_images_irrelevant', 'images', ['run_id', 'group_position'],
                    postgresql_where=sa.text("summary = '无关图片'"), sqlite_where=sa.text("summary = '无关图片'"))
    op.create_index('ix_groups_label', 'groups', ['run_id', 'label', 'position'])
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql':
        return  # SQLite searches with LIKE over the run's rows
    # The extension needs CREATE on the database (or a trusted extension); without it search scans
    # the run in output order, as SQLite does.
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError:
        return
    # Finished rows only: registering a run inserts nothing here (a full index doubles create_run's
    # time); a row enters when its result is written. Unfinished rows are searched by path (queries).
    bind.execute(sa.text(f"CREATE INDEX ix_images_search ON images USING gin ({SEARCH_TEXT} gin_trgm_ops) "
                         f"WHERE {FINISHED_ROW}"))


def _search_downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_images_search")
    op.drop_index('ix_groups_label', table_name='groups')
    op.drop_index('ix_images_irrelevant', table_name='images')
    op.drop_index('ix_images_failed', table_name='images')


def upgrade() -> None:
    _reuse_upgrade()  # the counters' triggers read reused_from
    _counters_upgrade()
    _search_upgrade()


def downgrade() -> None:
    _search_downgrade()
    _counters_downgrade()
    _reuse_downgrade()
