"""Ingest against the real embedded Postgres: cleaning rules, encodings, layouts, bad rows, idempotence."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from recsys.catalog.ingest import IngestError, ingest_file, is_non_product
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
