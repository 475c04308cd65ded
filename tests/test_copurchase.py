"""Co-purchase counts kept up to date incrementally, and unchanged files not loaded twice (issue 16)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from recsys.catalog.copurchase import rebuild_copurchase
from recsys.catalog.ingest import ingest_file

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"


def line(invoice: str, code: str, day: int, customer: int = 100) -> str:
    return f"{invoice},{code},ITEM {code},1,2011-01-{day:02d} 10:00:00,1.0,{customer},UK\n"


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(lines))
    return path


def counts(engine) -> tuple[set, set]:
    with engine.connect() as conn:
        pairs = set(conn.execute(text("SELECT stock_code, other_stock_code, invoices FROM copurchase")).all())
        singles = set(conn.execute(text("SELECT stock_code, other_stock_code FROM copurchase_singles")).all())
    return pairs, singles


def rebuilt(engine) -> tuple[set, set]:
    with engine.begin() as conn:
        rebuild_copurchase(conn)
    return counts(engine)


# Eight invoices over four days: pairs seen once, twice and more, a non-product (POST) that is never
# counted, and a product bought twice in one invoice (counted once).
EARLY = [line("A1", "10001", 1), line("A1", "10002", 1), line("A1", "10003", 1), line("A1", "POST", 1),
         line("A2", "10001", 2), line("A2", "10002", 2), line("A2", "10002", 2, customer=101),
         line("A3", "10003", 2), line("A3", "10004", 2)]
LATE = [line("B1", "10001", 3), line("B1", "10003", 3), line("B1", "10004", 3), line("B1", "POST", 3),
        line("B2", "10002", 4), line("B2", "10005", 4), line("B3", "10005", 4), line("B3", "10002", 4),
        line("A3", "10005", 4)]  # a late line of an earlier invoice


def test_appended_purchases_are_counted_like_a_full_rebuild(db, engine, tmp_path):
    first = ingest_file(write(tmp_path, "early.csv", EARLY), db)
    assert first.copurchase_mode == "rebuilt"
    second = ingest_file(write(tmp_path, "late.csv", EARLY[:2] + LATE), db)
    assert second.copurchase_mode == "counted" and second.rows_new == len(LATE)
    incremental = counts(engine)
    assert incremental == rebuilt(engine)
    pairs = {(a, b): n for a, b, n in incremental[0]}
    assert pairs[("10001", "10002")] == 2 and pairs[("10002", "10005")] == 2 and pairs[("10003", "10004")] == 2
    assert ("10003", "10005") in incremental[1] and all("POST" not in pair for pair in pairs)


def test_a_plain_sql_insert_keeps_the_counts_current(db, engine, tmp_path):
    ingest_file(write(tmp_path, "early.csv", EARLY), db)
    with engine.begin() as conn:
        conn.execute(text(
            """
            INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity,
                                   unit_price, invoiced_at, country)
            SELECT decode(md5('sql-' || stock_code), 'hex'), 'S1', stock_code, 100, description, 1, 1.0,
                   '2011-02-01', 'UK'
            FROM products WHERE stock_code IN ('10001', '10002', '10004')
            """
        ))
    incremental = counts(engine)
    assert incremental == rebuilt(engine)
    assert ("10001", "10002", 3) in incremental[0] and ("10001", "10004", 2) not in incremental[0]


def test_an_unchanged_file_is_recorded_without_being_loaded_again(db, engine, tmp_path):
    path = write(tmp_path, "early.csv", EARLY)
    first = ingest_file(path, db)
    again = ingest_file(path, db)
    assert again.unchanged_since_run == first.run_id and again.copurchase_mode == "unchanged"
    assert (again.rows_read, again.rows_loaded, again.rows_new) == (first.rows_read, first.rows_loaded, 0)
    assert again.purchases_total == first.purchases_total
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT status, rows_new, details ->> 'sha256' FROM ingest_runs ORDER BY id")).all()
    assert [run.status for run in runs] == ["succeeded", "unchanged"] and runs[0][2] == runs[1][2] == again.sha256
    path.write_text(path.read_text() + line("D1", "10001", 5))
    changed = ingest_file(path, db)
    assert changed.unchanged_since_run is None and changed.rows_new == 1
