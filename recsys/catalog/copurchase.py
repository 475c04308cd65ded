"""Co-purchase counts: for each ordered pair of products, the invoices that contain both.

`copurchase` holds the pairs seen in at least two invoices (what SQL users and the rankers read);
`copurchase_singles` the pairs seen in exactly one, so that a second invoice can promote them.
Both are kept up to date by a statement trigger on `purchases` (sql/0006): an insert recounts only
the invoices its lines belong to, so appending a day of purchases costs a few thousand pairs instead
of recomputing all 18 M in-invoice pairs. An ingest defers the trigger for its transaction and, after
the products' flags are settled, counts its new lines once, or rebuilds everything when it loaded
into an empty table or added more than a quarter of all lines (then one aggregate over all pairs is
cheaper than counting invoice by invoice).
Non-products are never counted; purchases are only ever appended (a deletion needs `rebuild_copurchase`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from recsys.platform.bulk import indexes_rebuilt_after

DEFERRED_SETTING = "recsys.copurchase_deferred"


def defer_counting(conn: Connection) -> None:
    """Until this transaction ends, inserts into purchases leave the co-purchase counts to the caller."""
    conn.execute(text("SELECT set_config(:name, 'on', true)"), {"name": DEFERRED_SETTING})


def count_new_purchases(conn: Connection, ids_table: str) -> None:
    """Add the purchase lines whose ids are in the temporary table `ids_table` (column `id`) to the counts."""
    conn.execute(text(f"SELECT copurchase_count(ARRAY(SELECT id FROM {ids_table}))"))


def rebuild_copurchase(conn: Connection) -> None:
    """Recompute both tables from every purchase (the same pairs the old materialized view held)."""
    conn.execute(text("SET LOCAL work_mem = '256MB'"))
    conn.execute(text("TRUNCATE copurchase, copurchase_singles"))
    with indexes_rebuilt_after(conn, "copurchase"), indexes_rebuilt_after(conn, "copurchase_singles"):
        _insert_all_pairs(conn)


def _insert_all_pairs(conn: Connection) -> None:
    conn.execute(
        text(
            """
            WITH invoice_items AS (
                SELECT DISTINCT pu.invoice_no, pu.stock_code
                FROM purchases pu JOIN products p USING (stock_code)
                WHERE NOT p.is_non_product
            ), pairs AS (
                SELECT a.stock_code, b.stock_code AS other_stock_code, count(*)::integer AS invoices
                FROM invoice_items a
                JOIN invoice_items b ON a.invoice_no = b.invoice_no AND a.stock_code <> b.stock_code
                GROUP BY a.stock_code, b.stock_code
            ), singles AS (
                INSERT INTO copurchase_singles (stock_code, other_stock_code)
                SELECT stock_code, other_stock_code FROM pairs WHERE invoices = 1
            )
            INSERT INTO copurchase (stock_code, other_stock_code, invoices)
            SELECT stock_code, other_stock_code, invoices FROM pairs WHERE invoices >= 2
            """
        )
    )
