"""Bulk loads into a table without maintaining its indexes row by row.

Loading hundreds of thousands of rows into a table with several b-tree indexes (one of them on a
hash, so in random order) and foreign keys (a lookup per row) costs far more than building the
indexes once afterwards and checking each foreign key with one join. `indexes_rebuilt_after`
drops the table's indexes and constraints inside the caller's transaction and re-creates them,
from the definitions the catalog held, when the block ends; on an error the transaction rolls
back and they were never gone. Constraints that another table's foreign key depends on, and NOT
NULL and CHECK constraints (cheap per row), are kept.

Dropping takes an ACCESS EXCLUSIVE lock on the table until commit: use it where the table is
empty or rebuilt whole (a first load, a full recomputation), not for small appends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

# Memory for each index build, per statement; a transaction-local setting.
BUILD_MAINTENANCE_WORK_MEM = "256MB"

_DEFINITIONS = text(
    """
    SELECT 'constraint' AS kind, c.conname AS name, pg_get_constraintdef(c.oid) AS definition,
           c.contype AS type
    FROM pg_constraint c
    WHERE c.conrelid = CAST(:table AS regclass) AND c.contype IN ('p', 'u', 'f')
      AND NOT EXISTS (SELECT 1 FROM pg_constraint r WHERE r.contype = 'f' AND r.conindid = c.conindid
                      AND r.conrelid <> c.conrelid AND c.contype <> 'f')
    UNION ALL
    SELECT 'index', i.relname, pg_get_indexdef(x.indexrelid), 'i'
    FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    WHERE x.indrelid = CAST(:table AS regclass)
      AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
    """
)
# Re-created in this order: keys first (foreign keys of other tables may need them), plain indexes,
# then this table's foreign keys (each checked by one query over the loaded rows).
_ORDER = {"p": 0, "u": 1, "i": 2, "f": 3}


@dataclass(frozen=True)
class _Definition:
    kind: str
    name: str
    definition: str
    type: str


@contextmanager
def indexes_rebuilt_after(conn: Connection, table: str) -> Iterator[None]:
    """Drop `table`'s indexes, keys and foreign keys for the block; re-create them after it."""
    found = [_Definition(*row) for row in conn.execute(_DEFINITIONS, {"table": table}).all()]
    quoted = conn.dialect.identifier_preparer.quote
    for item in sorted(found, key=lambda d: -_ORDER[d.type]):  # foreign keys first, keys last
        if item.kind == "constraint":
            conn.execute(text(f"ALTER TABLE {quoted(table)} DROP CONSTRAINT {quoted(item.name)}"))
        else:
            conn.execute(text(f"DROP INDEX {quoted(item.name)}"))
    yield
    started = time.perf_counter()
    conn.execute(text("SELECT set_config('maintenance_work_mem', :memory, true)"),
                 {"memory": BUILD_MAINTENANCE_WORK_MEM})
    for item in sorted(found, key=lambda d: _ORDER[d.type]):
        if item.kind == "constraint":
            conn.execute(text(f"ALTER TABLE {quoted(table)} ADD CONSTRAINT {quoted(item.name)} {item.definition}"))
        else:
            conn.execute(text(item.definition))
    log.info("%s: %d indexes and constraints re-created in %.1f s", table, len(found),
             time.perf_counter() - started)
