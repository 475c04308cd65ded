"""Bulk loads that build a table's indexes once afterwards leave the schema exactly as the migrations made it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from recsys.catalog.copurchase import rebuild_copurchase
from recsys.catalog.ingest import ingest_file
from recsys.platform import migrations
from recsys.platform.bulk import indexes_rebuilt_after

SCHEMA_OF = text(
    """
    SELECT 'constraint', conname, pg_get_constraintdef(oid) FROM pg_constraint
    WHERE conrelid = CAST(:table AS regclass)
    UNION ALL
    SELECT 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
    WHERE indrelid = CAST(:table AS regclass)
    UNION ALL
    SELECT 'trigger', tgname, pg_get_triggerdef(oid) FROM pg_trigger
    WHERE tgrelid = CAST(:table AS regclass) AND NOT tgisinternal
    """
)
TABLES = ("purchases", "copurchase", "copurchase_singles")


def schema(engine) -> dict[str, set]:
    with engine.connect() as conn:
        return {table: set(conn.execute(SCHEMA_OF, {"table": table}).all()) for table in TABLES}


def test_first_load_and_rebuild_keep_every_index_and_constraint(engine, db, sample_csv):
    before = schema(engine)
    assert any(kind == "index" and "row_hash" in definition for kind, _, definition in before["purchases"])
    report = ingest_file(sample_csv, db)  # a first load: indexes built after the rows
    assert report.rows_new > 0 and report.copurchase_mode == "rebuilt"
    assert schema(engine) == before
    migrations.check(db)  # the database still matches the migrations and the models
    with engine.begin() as conn:
        rebuild_copurchase(conn)
    assert schema(engine) == before


def test_a_failed_load_leaves_the_indexes_in_place(engine):
    before = schema(engine)
    with pytest.raises(RuntimeError), engine.begin() as conn, indexes_rebuilt_after(conn, "purchases"):
        assert schema_in(conn, "purchases") == set()  # inside the block only NOT NULL / CHECK remain
        raise RuntimeError("the load broke off")
    assert schema(engine) == before


def schema_in(conn, table: str) -> set:
    rows = conn.execute(SCHEMA_OF, {"table": table}).all()
    return {row for row in rows if row[0] != "trigger" and "NOT NULL" not in row[2] and "CHECK" not in row[2]}


def test_the_first_load_drops_rows_equal_after_trimming_like_a_later_load(engine, db, tmp_path):
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    same = "A1,10001,ITEM ONE,1,2011-01-01 10:00:00,1.0,100,UK\n"
    padded = "A1, 10001 ,ITEM ONE ,1,2011-01-01 10:00:00,1.0,100,UK\n"
    first = tmp_path / "first.csv"
    first.write_text(header + same + padded)
    assert ingest_file(first, db).rows_new == 1
    again = tmp_path / "again.csv"
    again.write_text(header + padded + "A2,10002,ITEM TWO,1,2011-01-02 10:00:00,1.0,100,UK\n")
    assert ingest_file(again, db).rows_new == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM purchases")).scalar_one() == 2
