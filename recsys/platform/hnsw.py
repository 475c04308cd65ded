"""The products' HNSW index: its build settings, sized from the catalog, and the column's type.

A build whose graph fits in `maintenance_work_mem` runs several times faster than one that
spills to disk (a 1M-row `vector(384)` build at 1 GB had not finished in 30 minutes), and
parallel maintenance workers share the insertion work. Both are set per build, in the build's
own transaction (`SET LOCAL`), so the server's defaults stay as the operator set them.

Products are stored as `vector(384)` (float32) or, with `RECSYS_EMBEDDING_TYPE=halfvec`, as
`halfvec(384)` (float16: half the table and index). Queries need no change: pgvector casts a
`vector` parameter to `halfvec` implicitly, so `embedding <=> $1` still uses the index.
"""

from __future__ import annotations

import logging
import os
import time

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

EMBEDDING_TYPES = ("vector", "halfvec")
EMBEDDING_DIM = 384
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
INDEX_NAME = "ix_products_embedding_hnsw"
MAX_PARALLEL_WORKERS = 7
# per tuple, beyond the value and the level-0 neighbour list: element header, upper-layer lists
# and allocator slack; fitted to pgvector 0.8 (1 GB held 482,160 vector(384) tuples at m=16)
TUPLE_OVERHEAD_BYTES = 170


def build_memory_mb(n_rows: int, embedding_type: str = "vector", dims: int = EMBEDDING_DIM, m: int = HNSW_M) -> int:
    """`maintenance_work_mem` (MB) that holds the whole graph of an `n_rows` HNSW build in memory.

    Per tuple: the value (8-byte header + dims x 4 bytes, or x 2 for halfvec), the level-0
    neighbour list (2m candidates of 16 bytes) and TUPLE_OVERHEAD_BYTES; 25% headroom, rounded up
    to 64 MB steps, at least 64 MB.
    """
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding type must be one of {', '.join(EMBEDDING_TYPES)}, not {embedding_type!r}")
    per_tuple = 8 + dims * (2 if embedding_type == "halfvec" else 4) + 2 * m * 16 + TUPLE_OVERHEAD_BYTES
    mb = n_rows * per_tuple * 1.25 / 2**20
    return max(64, int(-(-mb // 64) * 64))


def parallel_workers(cores: int | None = None) -> int:
    """Parallel maintenance workers for a build: one per core beside the leader, at most 7."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(0, min(MAX_PARALLEL_WORKERS, cores - 1))


def build_settings(n_rows: int, embedding_type: str = "vector") -> dict[str, str]:
    """The per-build server settings for an index over `n_rows` products."""
    return {
        "maintenance_work_mem": f"{build_memory_mb(n_rows, embedding_type)}MB",
        "max_parallel_maintenance_workers": str(parallel_workers()),
    }


def column_type(conn: Connection) -> str:
    """'vector' or 'halfvec': how products.embedding is stored now."""
    declared = conn.execute(text(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'products'::regclass AND attname = 'embedding' AND NOT attisdropped"
    )).scalar_one()
    return declared.split("(")[0]


def build_index(conn: Connection, embedding_type: str | None = None) -> dict:
    """(Re)build the products' HNSW index in the caller's transaction, with settings sized from the
    number of embedded products. Returns what was done, for logs and reports."""
    embedding_type = embedding_type or column_type(conn)
    rows = conn.execute(text("SELECT count(*) FROM products WHERE embedding IS NOT NULL")).scalar_one()
    chosen = build_settings(rows, embedding_type)
    for name, value in chosen.items():
        conn.execute(text("SELECT set_config(:name, :value, true)"), {"name": name, "value": value})
    started = time.perf_counter()
    conn.execute(text(f"DROP INDEX IF EXISTS {INDEX_NAME}"))
    conn.execute(text(
        f"CREATE INDEX {INDEX_NAME} ON products USING hnsw (embedding {embedding_type}_cosine_ops) "
        f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
    ))
    seconds = time.perf_counter() - started
    log.info("built %s over %d %s rows in %.1f s (%s)", INDEX_NAME, rows, embedding_type, seconds,
             ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return {"rows": rows, "embedding_type": embedding_type, "seconds": round(seconds, 2), **chosen}


def convert_embedding_type(conn: Connection, target: str) -> bool:
    """Store products.embedding as `target` ('vector' or 'halfvec'), rebuilding the index; False when
    it already is. Runs in the caller's transaction (a migration's)."""
    if target not in EMBEDDING_TYPES:
        raise ValueError(f"RECSYS_EMBEDDING_TYPE must be one of {', '.join(EMBEDDING_TYPES)}, not {target!r}")
    current = column_type(conn)
    if current == target:
        return False
    conn.execute(text(f"DROP INDEX IF EXISTS {INDEX_NAME}"))
    conn.execute(text(
        f"ALTER TABLE products ALTER COLUMN embedding TYPE {target}({EMBEDDING_DIM}) "
        f"USING embedding::{target}({EMBEDDING_DIM})"
    ))
    build_index(conn, target)
    log.info("products.embedding converted from %s to %s", current, target)
    return True
