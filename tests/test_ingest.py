"""Ingest against the real embedded Postgres: cleaning rules, encodings, layouts, bad rows, idempotence."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from recsys.catalog.ingest import IngestError, ingest_file, is_non_product, refresh_aggregates
from recsys.cli import cli

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"


def write(tmp_path: Path, name: str, body: str, encoding: str = "utf-8", header: str = HEADER) -> Path:
    path = tmp_path / name
    data = (header + body).encode(encoding)
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def counts(engine) -> dict:
    with engine.connect() as conn:
        return {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("purchases", "customers", "products", "ingest_runs")
        }


def test_cleaning_rules_in_the_notebooks_order(db, engine, tmp_path):
    body = (
        "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850,United Kingdom\n"
        "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850,United Kingdom\n"  # duplicate
        "536366,22224,WHITE LOVEBIRD LANTERN,2,2010-12-01 08:28:00,2.95,,United Kingdom\n"  # null customer
        "536367,22225,,2,2010-12-01 08:29:00,2.95,17850,United Kingdom\n"  # null description
        "C536368,71053,WHITE METAL LANTERN,-1,2010-12-01 09:00:00,3.39,17850,United Kingdom\n"  # cancelled
        "536369,21669,BLUE STRIPE CERAMIC DRAWER KNOB,12,2010-12-02 09:00:00,1.25,15781,United Kingdom\n"
    )
    report = ingest_file(write(tmp_path, "rules.csv", body), db)
    assert report.rows_read == 6
    assert (report.rows_with_nulls, report.duplicate_rows, report.cancelled_rows) == (2, 1, 1)
    assert report.rows_loaded == report.rows_new == 2
    assert counts(engine)["purchases"] == 2
    assert counts(engine)["customers"] == 2


def test_iso_8859_1_and_us_dates(db, engine, tmp_path):
    body = (
        "536365,84029E,RED WOOLLY HOTTIE WHITE HEART £,6,12/1/2010 8:26,3.39,17850,United Kingdom\n"
        "536366,21730,GLASS STAR FROSTED T-LIGHT HOLDER,6,12/13/2010 14:05,4.25,12583,Réunion\n"
    )
    path = write(tmp_path, "latin1.csv", body, encoding="iso-8859-1")
    report = ingest_file(path, db)
    assert report.rows_loaded == 2 and report.rows_rejected == 0
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT description, invoiced_at, country FROM purchases ORDER BY invoice_no")).all()
    assert rows[0].description.endswith("£")
    assert rows[0].invoiced_at.isoformat() == "2010-12-01T08:26:00"
    assert rows[1].invoiced_at.isoformat() == "2010-12-13T14:05:00"
    assert rows[1].country == "Réunion"


def test_online_retail_ii_columns_and_gzip(db, engine, tmp_path):
    header = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n"
    body = "489434,85048,15CM CHRISTMAS GLASS BALL 20 LIGHTS,12,2009-12-01 07:45:00,6.95,13085.0,United Kingdom\n"
    report = ingest_file(write(tmp_path, "retail_ii.csv.gz", body, header=header), db)
    assert report.rows_loaded == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT customer_id FROM purchases")).scalar_one() == 13085


def test_xlsx(db, engine, tmp_path):
    frame = pd.DataFrame(
        {
            "InvoiceNo": ["536365", "536365"],
            "StockCode": ["71053", "22224"],
            "Description": ["WHITE METAL LANTERN", "WHITE LOVEBIRD LANTERN"],
            "Quantity": [6, 2],
            "InvoiceDate": pd.to_datetime(["2010-12-01 08:26:00", "2010-12-01 08:26:00"]),
            "UnitPrice": [3.39, 2.95],
            "CustomerID": [17850.0, 17850.0],
            "Country": ["United Kingdom", "United Kingdom"],
        }
    )
    path = tmp_path / "sheet.xlsx"
    frame.to_excel(path, index=False)
    report = ingest_file(path, db)
    assert report.rows_loaded == 2 and report.rows_rejected == 0


def test_bad_rows_are_counted_and_do_not_stop_the_load(db, engine, tmp_path):
    body = (
        "536365,71053,WHITE METAL LANTERN,six,2010-12-01 08:26:00,3.39,17850,United Kingdom\n"
        "536366,22224,WHITE LOVEBIRD LANTERN,2,yesterday,2.95,17850,United Kingdom\n"
        "536367,22225,RED HEART,2,2010-12-01 08:26:00,cheap,17850,United Kingdom\n"
        "536368,22226,BLUE HEART,2,2010-12-01 08:26:00,1.00,abc,United Kingdom\n"
        "536369,21669,BLUE STRIPE CERAMIC DRAWER KNOB,12,2010-12-02 09:00:00,1.25,15781,United Kingdom\n"
    )
    report = ingest_file(write(tmp_path, "bad.csv", body), db)
    assert report.rows_rejected == 4
    assert report.rows_loaded == 1
    with engine.connect() as conn:
        run = conn.execute(text("SELECT * FROM ingest_runs")).one()
    assert (run.status, run.rows_read, run.rows_rejected, run.rows_loaded) == ("succeeded", 5, 4, 1)
    assert run.seconds > 0
    assert len(run.details["rejected_examples"]) == 4


def test_reingest_leaves_the_same_counts(db, engine, sample_csv):
    first = ingest_file(sample_csv, db)
    before = counts(engine)
    second = ingest_file(sample_csv, db)
    after = counts(engine)
    assert second.rows_new == 0 and first.rows_new == first.rows_loaded
    assert {k: v for k, v in before.items() if k != "ingest_runs"} == {
        k: v for k, v in after.items() if k != "ingest_runs"
    }
    assert after["ingest_runs"] == 2


def test_products_get_canonical_description_and_flags(db, engine, tmp_path):
    body = (
        "1,71053,WHITE METAL LANTERN,1,2010-12-01 08:26:00,3.39,17850,United Kingdom\n"
        "2,71053,WHITE METAL LANTERN,1,2010-12-01 08:27:00,3.39,17850,United Kingdom\n"
        "3,71053,white metal lantern (damaged),1,2010-12-01 08:28:00,3.39,17850,United Kingdom\n"
        "4,POST,POSTAGE,1,2010-12-01 08:29:00,18.00,17850,United Kingdom\n"
        "5,BANK CHARGES,Bank Charges,1,2010-12-01 08:29:00,15.00,17850,United Kingdom\n"
    )
    ingest_file(write(tmp_path, "canon.csv", body), db)
    with engine.connect() as conn:
        products = {r.stock_code: r for r in conn.execute(text("SELECT * FROM products")).all()}
    assert products["71053"].description == "WHITE METAL LANTERN"
    assert products["71053"].purchase_count == 3
    assert not products["71053"].is_non_product
    assert products["POST"].is_non_product and products["BANK CHARGES"].is_non_product


@pytest.mark.parametrize("code,expected", [("POST", True), ("DOT", True), ("M", True), ("gift_0001_10", True),
                                           ("AMAZONFEE", True), ("85123A", False), ("DCGS0003", False)])
def test_non_product_codes(code, expected):
    assert is_non_product(code) is expected


def test_bad_input_changes_nothing(db, engine, tmp_path):
    missing_columns = write(tmp_path, "cols.csv", "1,2\n", header="Foo,Bar\n")
    not_tabular = tmp_path / "binary.csv.gz"
    not_tabular.write_bytes(b"\x1f\x8b\x08garbage")
    for path in (tmp_path / "absent.csv", missing_columns, not_tabular, tmp_path / "notes.json"):
        with pytest.raises(IngestError):
            ingest_file(path, db)
    assert counts(engine) == {"purchases": 0, "customers": 0, "products": 0, "ingest_runs": 0}


def test_cli_bad_input_exits_2_with_one_line(db, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(tmp_path / "absent.csv")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no such file" in result.output
    cols = write(tmp_path, "cols.csv", "1,2\n", header="Foo,Bar\n")
    result = runner.invoke(cli, ["ingest", str(cols)])
    assert result.exit_code == 2
    assert "lacks the column(s)" in result.output


def test_cli_ingest_json(db, sample_csv):
    import json

    result = CliRunner().invoke(cli, ["ingest", str(sample_csv), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["rows_loaded"] == 20 and payload["customers_total"] == 5


@pytest.mark.slow
def test_full_bundled_file(db, engine):
    report = ingest_file(Path(__file__).parent.parent / "data" / "online_retail.csv.gz", db)
    assert report.rows_read == 541_909
    assert report.rows_loaded == 392_732
    assert report.customers_total == 4_339
    assert report.products_total == 3_665
    assert counts(engine)["purchases"] == 392_732
    # The first load set products' and customers' aggregates from the frame: SQL's recomputation agrees.
    from_the_frame = stored(engine)
    with engine.begin() as conn:
        refresh_aggregates(conn)
    assert stored(engine) == from_the_frame


# Rows whose stored text is easy to get wrong: prices that round (half away from zero) or print in exponent
# form, a negative zero, US dates and seconds, padding, a blank country (NULL), unicode, and the characters
# COPY escapes or that concat_ws's separator could confuse.
TRICKY_BODY = (
    "A1,10001,PLAIN ITEM,1,2011-01-01 10:00:00,1.0,100,United Kingdom\n"
    "A1,10002,HALF UP,2,2011-01-01 10:00:00,2.0005,100,United Kingdom\n"
    "A2,10002,HALF UP,3,2011-01-02 10:00:00,-0.0005,101,France\n"
    "A2,10003,TINY,4,2011-01-02 10:00:00,0.00001,101,France\n"
    "A3,10003,TINY,-5,12/31/2011 23:59,123456.7894999,13085.0,EIRE\n"
    "A3,10004,\"PIPE | AND \"\"QUOTES\"\"\",6,12/31/2011 23:59:58,999999.9995,102,  \n"
    'A4,10005,"TAB\tNEW\nLINE\\BACKSLASH",7,2011-02-01 08:00,3.0,103,R\u00e9union\n'
    "A4, 10006 ,  caf\u00e9 cr\u00e8me \u2603 ,8,2011-02-01 08:00:00,0.1,103,R\u00e9union\n"
    "A5,10001,PLAIN ITEM,9,2011-03-01 09:00:00,1e-05,104,Channel Islands\n"
    "A5,10002,HALF UP,10,2011-03-01 09:00:00,0.30000000000000004,104,Channel Islands\n"
)
HASHED_IN_SQL = text(
    "SELECT count(*) FROM purchases WHERE row_hash <> decode(md5(concat_ws('|', invoice_no, stock_code, "
    "description, quantity, unit_price, invoiced_at, customer_id, country)), 'hex')"
)


def stored(engine) -> dict[str, list]:
    with engine.connect() as conn:
        return {
            "purchases": conn.execute(text(
                "SELECT id, row_hash, invoice_no, stock_code, customer_id, description, quantity, unit_price, "
                "invoiced_at, country FROM purchases ORDER BY id")).all(),
            "products": conn.execute(text(
                "SELECT stock_code, description, price, purchase_count, quantity_total, customer_count, "
                "is_non_product FROM products ORDER BY stock_code")).all(),
            "customers": conn.execute(text(
                "SELECT customer_id, country, purchase_count, first_purchase_at, last_purchase_at "
                "FROM customers ORDER BY customer_id")).all(),
        }


def test_a_first_load_hashes_rows_as_sql_does_and_in_hash_order(db, engine, tmp_path):
    report = ingest_file(write(tmp_path, "tricky.csv", TRICKY_BODY), db)
    assert report.rows_new == 10 and report.rows_rejected == 0
    with engine.connect() as conn:
        assert conn.execute(HASHED_IN_SQL).scalar_one() == 0
        hashes = conn.execute(text("SELECT row_hash FROM purchases ORDER BY id")).scalars().all()
        assert hashes == sorted(hashes)  # ids in hash order, as the staging path's DISTINCT ON gave them
        ids = conn.execute(text("SELECT id FROM purchases ORDER BY id")).scalars().all()
        assert ids == list(range(ids[0], ids[0] + 10))  # consecutive, and the sequence left at the last one
        assert conn.execute(text("SELECT last_value, is_called FROM purchases_id_seq")).one() == (ids[-1], True)
        row = conn.execute(text("SELECT * FROM purchases WHERE stock_code = '10004'")).one()
        assert row.country is None and str(row.unit_price) == "1000000.000"
        assert conn.execute(text("SELECT description FROM purchases WHERE stock_code = '10005'")).scalar_one() == (
            "TAB\tNEW\nLINE\\BACKSLASH")
    # The same rows in other bytes: a later load (hashed in SQL) finds every one of them already there.
    again = ingest_file(write(tmp_path, "tricky_again.csv", TRICKY_BODY + TRICKY_BODY), db)
    assert again.unchanged_since_run is None and again.rows_new == 0


def test_a_first_load_stores_what_the_staging_path_stores(db, engine, tmp_path, sample_csv, monkeypatch):
    """The fast first load against the staging path that hashes in SQL (the path every later load takes)."""
    from recsys.catalog import ingest

    tricky = write(tmp_path, "tricky.csv", TRICKY_BODY)
    loads = {}
    for path_taken in ("fast", "staging"):
        if path_taken == "staging":
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE purchases, products, customers, copurchase, copurchase_singles, "
                                  "ingest_runs RESTART IDENTITY CASCADE"))
            monkeypatch.setattr(ingest, "_hashes_match_this_session", lambda conn: False)
        reports = [ingest_file(tricky, db), ingest_file(sample_csv, db)]
        loads[path_taken] = ([(r.rows_new, r.rows_loaded, r.copurchase_mode) for r in reports], stored(engine))
    assert loads["fast"] == loads["staging"]
    assert loads["fast"][0][0] == (10, 10, "rebuilt")


def test_whether_python_may_hash_depends_on_the_session(db, engine):
    from recsys.catalog.ingest import _hashes_match_this_session

    with engine.begin() as conn:
        assert _hashes_match_this_session(conn)
        conn.execute(text("SET LOCAL DateStyle = 'German'"))
        assert not _hashes_match_this_session(conn)


def test_prices_are_rounded_as_postgres_rounds_them(engine):
    """The text of numeric(12, 3) for each float the staging path sent, here and in Postgres."""
    import numpy as np

    from recsys.catalog.ingest import _numeric_texts

    generator = np.random.default_rng(16)
    prices = np.concatenate([
        *(generator.uniform(-1000, 1000, 3_000).round(digits) for digits in range(7)),
        np.arange(-2000, 2000) / 2000 + 0.0005,
        generator.uniform(0, 999_999_998, 2_000),
        [0.0, -0.0, 1e-05, -1e-05, 0.0005, -0.0005, 2.0005, 1.0005, 0.30000000000000004, 999999999.999, 5e-324],
    ])
    sent = pd.Series(prices).to_numpy().astype(str).tolist()
    with engine.connect() as conn:
        expected = conn.execute(
            text("SELECT CAST(CAST(value AS numeric(12, 3)) AS text) FROM unnest(CAST(:sent AS text[])) AS value"),
            {"sent": sent},
        ).scalars().all()
    assert _numeric_texts(pd.Series(prices)) == expected


def test_rows_are_ordered_by_the_whole_hash_and_the_first_of_equal_hashes_kept():
    from recsys.catalog.ingest import _first_of_each_hash_in_order

    shared_start = b"\x01" * 8
    digests = [
        shared_start + b"\x09" * 8,  # same first 8 bytes as the next: the last 8 decide
        shared_start + b"\x02" * 8,
        b"\x00" * 16,
        shared_start + b"\x02" * 8,  # equal to row 1: row 1 is kept
        b"\xff" * 16,
    ]
    assert _first_of_each_hash_in_order(digests).tolist() == [2, 1, 0, 4]
    assert _first_of_each_hash_in_order([b"\x05" * 16, b"\x05" * 16]).tolist() == [0]
    assert _first_of_each_hash_in_order([]).tolist() == []


def test_columns_of_number_like_texts_keep_their_text(db, engine, tmp_path):
    """Codes, invoices, descriptions and countries that all look like numbers or booleans stay as written."""
    body = (
        "536365,085123,1.50,6,2010-12-01 08:26:00,3.39,17850,True\n"
        "536365,85123,1.5,6,2010-12-01 08:26:00,3.39,17850,True\n"
        "536366,85123,1.5,2,2010-12-01 08:28:00,2.95,17851,False\n"
        "536366,085123,1.50,2,2010-12-01 08:28:00,2.95,17851,False\n"
    )
    report = ingest_file(write(tmp_path, "numbers.csv", body), db)
    assert (report.rows_loaded, report.duplicate_rows) == (4, 0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT stock_code, description FROM products ORDER BY 1")).all() == [
            ("085123", "1.50"), ("85123", "1.5")]
        assert conn.execute(text("SELECT customer_id, country FROM customers ORDER BY 1")).all() == [
            (17850, "True"), (17851, "False")]
        assert conn.execute(text("SELECT DISTINCT invoice_no FROM purchases ORDER BY 1")).scalars().all() == [
            "536365", "536366"]


def test_a_first_load_into_a_catalog_that_has_products_updates_them_as_sql_does(db, engine, tmp_path):
    """Purchases empty but a product already there: placeholders, then refresh_aggregates, as before."""
    tricky = write(tmp_path, "tricky.csv", TRICKY_BODY)
    ingest_file(tricky, db)
    into_empty = stored(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE purchases, products, customers, copurchase, copurchase_singles, "
                          "ingest_runs RESTART IDENTITY CASCADE"))
        conn.execute(text("INSERT INTO products (stock_code, description) VALUES ('10001', 'OLD'), ('X1', 'GONE')"))
    report = ingest_file(tricky, db)
    assert report.rows_new == 10
    again = stored(engine)
    assert [p for p in again["products"] if p.stock_code != "X1"] == into_empty["products"]
    assert (again["purchases"], again["customers"]) == (into_empty["purchases"], into_empty["customers"])
