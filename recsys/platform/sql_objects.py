"""The plain-SQL functions and views in `sql/`: installing them (from migrations) and refreshing them.

The files are idempotent (CREATE OR REPLACE / IF NOT EXISTS), so a migration that changes
them simply re-applies every file.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, text

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"

FUNCTIONS = (
    "similar_products(text, integer)",
    "search_products(vector, integer, bigint)",
    "hybrid_search(text, vector, integer)",
    "customer_history(bigint, integer)",
)


def execute_raw(conn: Connection, statements: list[str]) -> None:
    """Run SQL text verbatim on the connection's own transaction (no bind-parameter parsing of % or :)."""
    raw = conn.connection.driver_connection
    for statement in statements:
        raw.execute(statement)


def install_statements() -> list[str]:
    """Each sql/ file as one statement batch, in file-name order."""
    return [path.read_text(encoding="utf-8") for path in sorted(SQL_DIR.glob("*.sql"))]


def drop_statements() -> list[str]:
    return [
        *(f"DROP FUNCTION IF EXISTS {signature}" for signature in FUNCTIONS),
        "DROP TYPE IF EXISTS similar_product",
        "DROP MATERIALIZED VIEW IF EXISTS copurchase",
        "DROP VIEW IF EXISTS product_popularity",
    ]


def refresh_materialized_views(conn: Connection) -> None:
    """Bring copurchase up to date; concurrently once populated, so readers are never blocked."""
    populated = conn.execute(
        text("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'copurchase'")
    ).scalar_one_or_none()
    if populated is None:
        return
    concurrently = "CONCURRENTLY " if populated else ""
    conn.execute(text(f"REFRESH MATERIALIZED VIEW {concurrently}copurchase"))
