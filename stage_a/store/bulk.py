"""Bulk fast paths (speed only: same rows, same semantics as the SQLAlchemy statements), and key chunking.

SQLAlchemy's executemany spends ~40 us of Python per row building parameters, and on psycopg it
becomes one pipelined statement per row (~100 us): minutes for a 1M-image run. These paths hand rows
straight to the driver (SQLite executemany, PostgreSQL COPY).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import insert

from stage_a.store.models import DONE, ImageRow
from stage_a.work import ImageKey

_INSERT_CHUNK = 5000
RESULT_COLUMNS = ("status", "summary", "raw_text", "error", "prompt_tokens", "completion_tokens",
                  "vision_tokens", "preprocess_ms", "generate_ms", "worker", "updated_at", "model", "engine",
                  "reuse_key", "stat_key", "reused_from")
"""The columns ResultStore.record_results writes."""
_PG_COPY_MIN_ROWS = 2
"""From this many rows, one COPY and one joined UPDATE: one statement fires the counters' triggers once
(executemany would fire them once per row)."""


def chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(it)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def by_run(keys: Sequence[ImageKey]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(run, [(group_position, image_index), ...]) in chunks of 500 keys, one run at a time."""
    for run_id, ks in itertools.groupby(sorted(keys), key=lambda k: k.run_id):
        yield from ((run_id, chunk) for chunk in chunks(((k.group_position, k.image_index) for k in ks), 500))


def _psycopg_connection(conn: Any) -> Any | None:
    """The psycopg 3 connection under a SQLAlchemy connection (None for other drivers)."""
    raw = getattr(conn.connection, "driver_connection", None)
    return raw if type(raw).__module__.startswith("psycopg") and hasattr(raw, "cursor") else None


def _bind_processors(conn: Any, table: Any, columns: Sequence[str]) -> list[Any]:
    """Each column type's bind processor for this dialect (e.g. SQLite stores datetimes as text)."""
    return [table.c[name].type.dialect_impl(conn.dialect).bind_processor(conn.dialect) for name in columns]


def bulk_insert(conn: Any, table: Any, rows: Iterator[dict[str, Any]]) -> None:
    """INSERT many rows of ``table`` in the current transaction: COPY on PostgreSQL, raw executemany on SQLite."""
    first = next(rows, None)
    if first is None:
        return
    rows = itertools.chain([first], rows)
    columns = list(first)
    prep = conn.dialect.identifier_preparer
    cols = ", ".join(prep.quote(c) for c in columns)
    pg = _psycopg_connection(conn) if conn.dialect.name == "postgresql" else None
    if pg is not None:
        with pg.cursor() as cur, cur.copy(f"COPY {prep.format_table(table)} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(tuple(row.values()))
        return
    if conn.dialect.name == "sqlite":
        procs = _bind_processors(conn, table, columns)
        sql = f"INSERT INTO {prep.format_table(table)} ({cols}) VALUES ({', '.join('?' * len(columns))})"
        for chunk in chunks(rows, _INSERT_CHUNK):
            if any(procs):
                chunk = [tuple(p(v) if p else v for p, v in zip(procs, r.values(), strict=True)) for r in chunk]
            else:
                chunk = [tuple(r.values()) for r in chunk]
            conn.exec_driver_sql(sql, chunk)
        return
    for chunk in chunks(rows, _INSERT_CHUNK):
        conn.execute(insert(table), chunk)


def fetch_rows(conn: Any, stmt: Any) -> list[tuple[Any, ...]]:
    """All rows of a SELECT as plain tuples: on psycopg through its own cursor (SQLAlchemy's result rows
    cost about as much client CPU again as the driver's: an export reads millions), else SQLAlchemy's.
    Only for columns the driver returns as the model's Python types (ints, text)."""
    pg = _psycopg_connection(conn) if conn.dialect.name == "postgresql" else None
    if pg is None:
        return [tuple(r) for r in conn.execute(stmt)]
    compiled = stmt.compile(dialect=conn.dialect)
    with pg.cursor() as cur:
        cur.execute(str(compiled), compiled.params)
        return cur.fetchall()


def bulk_update_results(conn: Any, rows: list[dict[str, Any]]) -> bool:
    """record_results' UPDATE done by the driver; False when the caller must use the SQLAlchemy path.

    Same semantics: a row already done is never overwritten; lease_until is cleared.
    """
    table = ImageRow.__table__
    prep = conn.dialect.identifier_preparer
    name = prep.format_table(table)
    keys = [(r["k_run"], r["k_pos"], r["k_idx"]) for r in rows]
    if conn.dialect.name == "sqlite":
        convert = [(i, p) for i, p in enumerate(_bind_processors(conn, table, RESULT_COLUMNS)) if p]
        sets = ", ".join(f"{prep.quote(c)} = ?" for c in RESULT_COLUMNS)
        sql = (f"UPDATE {name} SET {sets}, lease_until = NULL "
               "WHERE run_id = ? AND group_position = ? AND image_index = ? AND status != ?")
        values = operator.itemgetter(*RESULT_COLUMNS)
        memo: dict[Any, Any] = {}  # every row of a batch carries the same updated_at: convert it once
        params = []
        for r, k in zip(rows, keys, strict=True):
            v = values(r)
            if convert:
                v = list(v)
                for i, proc in convert:
                    x = v[i]
                    v[i] = memo[x] if x in memo else memo.setdefault(x, proc(x))
                v = tuple(v)
            params.append(v + k + (DONE,))
        conn.exec_driver_sql(sql, params)
        return True
    pg = _psycopg_connection(conn) if conn.dialect.name == "postgresql" else None
    if pg is None or len(rows) < _PG_COPY_MIN_ROWS or len(set(keys)) != len(keys):
        return False  # (duplicate keys: executemany's one-after-the-other semantics are kept)
    # COPY the batch into a session temp table (emptied at commit), then one joined UPDATE.
    cols = ", ".join(prep.quote(c) for c in RESULT_COLUMNS)
    typed = ", ".join(f"{prep.quote(c)} {table.c[c].type.compile(dialect=conn.dialect)}" for c in RESULT_COLUMNS)
    with pg.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_a_results_in "
            f"(k_run integer, k_pos integer, k_idx integer, {typed}) ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY stage_a_results_in (k_run, k_pos, k_idx, {cols}) FROM STDIN") as copy:
            values = operator.itemgetter(*RESULT_COLUMNS)
            for r, k in zip(rows, keys, strict=True):
                copy.write_row(k + values(r))
        sets = ", ".join(f"{prep.quote(c)} = r.{prep.quote(c)}" for c in RESULT_COLUMNS)
        # Primary-key lookups whatever the statistics say: on a freshly loaded run (not yet
        # analyzed) the planner would hash-join against a scan of the whole images table per batch.
        cur.execute("SET LOCAL enable_hashjoin = off")
        cur.execute("SET LOCAL enable_mergejoin = off")
        cur.execute(
            f"UPDATE {name} AS i SET {sets}, lease_until = NULL FROM stage_a_results_in AS r "
            "WHERE i.run_id = r.k_run AND i.group_position = r.k_pos AND i.image_index = r.k_idx "
            "AND i.status <> %s",
            (DONE,),
        )
    return True
