"""Load Online Retail transaction files into Postgres.

Cleaning follows the notebook exactly (rows with any null, then duplicate rows, then
invoices starting with "C"), so the bundled file yields 392,732 purchases by 4,339
customers. Rows that survive cleaning but cannot be parsed are rejected and counted; they
never stop the load. Purchases are keyed by a hash of the whole source row, so loading the
same file twice adds nothing. A first load into an empty database hashes the rows here, from the text
Postgres prints for each stored value (tests hold it to the SQL hash), COPies them in binary
straight into `purchases` and, into an empty catalog, inserts products and customers with their
aggregates worked out from the same rows; every later load goes through a staging table, hashes in SQL
and recomputes the aggregates there.
A file whose bytes (SHA-256) a succeeded run already loaded is not read again: purchases are
only ever appended, so all its rows are there; the run is recorded with the earlier run's
counts and nothing new.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
from psycopg.adapt import PyFormat
from psycopg.copy import QueuedLibpqWriter
from sqlalchemy import Connection, text

from recsys.catalog.copurchase import count_new_purchases, defer_counting, rebuild_copurchase
from recsys.config import Settings
from recsys.platform.bulk import indexes_rebuilt_after
from recsys.platform.db import get_engine

try:  # CPython's own MD5: twice as fast as OpenSSL's for a 100-byte row (no EVP context set up per call)
    from _md5 import md5 as _row_md5
except ImportError:
    from hashlib import md5 as _row_md5

log = logging.getLogger(__name__)

COLUMN_ALIASES = {
    "invoice_no": ("InvoiceNo", "Invoice"),
    "stock_code": ("StockCode",),
    "description": ("Description",),
    "quantity": ("Quantity",),
    "invoiced_at": ("InvoiceDate",),
    "unit_price": ("UnitPrice", "Price"),
    "customer_id": ("CustomerID", "Customer ID"),
    "country": ("Country",),
}
# Columns parsed as numbers: read as plain text, each row's own (a categorical's would be parsed on reading).
_NUMBER_COLUMNS = ("quantity", "unit_price", "customer_id")
REQUIRED_COLUMNS = ("invoice_no", "stock_code", "description", "quantity", "invoiced_at", "unit_price", "customer_id")

NON_PRODUCT_CODES = frozenset(
    {"POST", "M", "m", "DOT", "BANK CHARGES", "C2", "C3", "PADS", "AMAZONFEE", "CRUK", "D", "S", "B",
     "ADJUST", "ADJUST2", "TEST001", "TEST002"}
)
NON_PRODUCT_PREFIXES = ("gift_", "TEST")

# How the staging path sends a timestamp, and how Postgres (DateStyle ISO) prints it back for the row hash.
TIMESTAMP_TEXT = "%Y-%m-%d %H:%M:%S"
DATE_FORMATS = (TIMESTAMP_TEXT, "%m/%d/%Y %H:%M", "%Y-%m-%d %H:%M", "%m/%d/%Y %H:%M:%S")

ProgressCallback = Callable[[str], None]

# From this many new purchase lines, and this share of all, one full co-purchase aggregate is cheaper than
# counting the new invoices pair by pair (measured: counting 9,318 new lines of 24,861 took 21 s, rebuilding
# all 16 s; a day of 610 lines into 393k took 4.5 s against ~300 s for the rebuild, at load average 17-22).
REBUILD_MIN_ROWS = 5_000
REBUILD_SHARE = 0.25


class IngestError(ValueError):
    """The input cannot be loaded at all; the message is one line for the user."""


@dataclass
class IngestReport:
    source: str
    rows_read: int = 0
    rows_with_nulls: int = 0
    duplicate_rows: int = 0
    cancelled_rows: int = 0
    rows_rejected: int = 0
    rows_loaded: int = 0
    rows_new: int = 0
    copurchase_refresh_seconds: float = 0.0
    copurchase_mode: str = "counted"
    purchases_total: int = 0
    customers_total: int = 0
    products_total: int = 0
    seconds: float = 0.0
    run_id: int | None = None
    sha256: str | None = None
    unchanged_since_run: int | None = None
    rejected_examples: list[dict] = field(default_factory=list)

    @property
    def rows_cleaned_out(self) -> int:
        return self.rows_with_nulls + self.duplicate_rows + self.cancelled_rows

    def as_dict(self) -> dict:
        data = asdict(self)
        data["rows_cleaned_out"] = self.rows_cleaned_out
        data["rows_per_second"] = round(self.rows_read / self.seconds, 1) if self.seconds else None
        return data


def is_non_product(stock_code: str) -> bool:
    return stock_code in NON_PRODUCT_CODES or stock_code.startswith(NON_PRODUCT_PREFIXES)


def read_transactions(path: Path) -> pd.DataFrame:
    """Read a .csv, .csv.gz or .xlsx file into text columns with our names (text kept as read, never parsed)."""
    if not path.exists():
        raise IngestError(f"no such file: {path}")
    if not path.is_file():
        raise IngestError(f"not a file: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".xlsx", ".xlsm")):
            frame = pd.read_excel(path, dtype=str, keep_default_na=False, na_values=[""])
        elif name.endswith((".csv", ".csv.gz", ".txt", ".txt.gz")):
            frame = _read_csv(path)
        else:
            raise IngestError(f"unsupported file type {path.name!r}: expected .csv, .csv.gz or .xlsx")
    except IngestError:
        raise
    except PermissionError as exc:
        raise IngestError(f"cannot read {path}: permission denied") from exc
    except Exception as exc:
        raise IngestError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return _rename_columns(frame, path)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return _read_csv_as(path, "utf-8")
    except UnicodeDecodeError:
        log.info("%s is not UTF-8; reading it as ISO-8859-1", path)
        return _read_csv_as(path, "iso-8859-1")


def _read_csv_as(path: Path, encoding: str) -> pd.DataFrame:
    """The number columns as plain text, the others as categoricals of their texts.

    A categorical column keeps each distinct text once (400k rows repeat a few thousand values): it costs
    about what reading plain text does and saves coding the column in `clean`. The parser turns the
    categories of a column whose every value reads as a number or a boolean into those; such a column is
    read again as text.
    """
    options = dict(encoding=encoding, keep_default_na=False, na_values=[""], compression="infer")
    as_text = {alias: str for name in _NUMBER_COLUMNS for alias in COLUMN_ALIASES[name]}
    frame = pd.read_csv(path, dtype=defaultdict(lambda: "category", as_text), **options)
    converted = [
        column for column, values in frame.items()
        if isinstance(values.dtype, pd.CategoricalDtype) and not pd.api.types.is_string_dtype(values.cat.categories)
    ]
    if converted:
        frame[converted] = pd.read_csv(path, dtype=str, usecols=converted, **options)[converted]
    return frame


def _rename_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    stripped = {str(column).strip(): column for column in frame.columns}
    renames = {}
    for ours, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in stripped:
                renames[stripped[alias]] = ours
                break
    missing = [name for name in REQUIRED_COLUMNS if name not in renames.values()]
    if missing:
        wanted = ", ".join(COLUMN_ALIASES[name][0] for name in missing)
        raise IngestError(f"{path.name} lacks the column(s) {wanted}")
    frame = frame[list(renames)].rename(columns=renames)
    if "country" not in frame.columns:
        frame["country"] = "Unknown"
    return frame[list(COLUMN_ALIASES)]


def clean(frame: pd.DataFrame, report: IngestReport) -> pd.DataFrame:
    """The notebook's cleaning, in its order, counting what each step removes.

    The columns come back as categoricals (codes into each column's distinct texts): rows are compared,
    and later parsed, by those codes, a few thousand distinct values instead of 400k texts per column.
    """
    report.rows_read = len(frame)
    no_nulls = _as_categories(frame.dropna())
    report.rows_with_nulls = len(frame) - len(no_nulls)
    unique = no_nulls.drop_duplicates()
    report.duplicate_rows = len(no_nulls) - len(unique)
    kept = unique[~unique["invoice_no"].str.startswith("C")]
    report.cancelled_rows = len(unique) - len(kept)
    return kept


def _as_categories(frame: pd.DataFrame) -> pd.DataFrame:
    """Each column as codes into its distinct values (equal texts, equal codes); categoricals stay as read."""
    columns = {}
    for name, values in frame.items():
        if isinstance(values.dtype, pd.CategoricalDtype):
            columns[name] = values
            continue
        codes, distinct = pd.factorize(values)
        columns[name] = pd.Categorical.from_codes(codes, distinct)
    return pd.DataFrame(columns, index=frame.index)


def parse(frame: pd.DataFrame, report: IngestReport) -> pd.DataFrame:
    """Typed columns; rows whose values do not parse are dropped and counted as rejected."""
    coded = _parse_coded(frame, report)
    texts = {name: dtype.categories.dtype for name, dtype in coded.dtypes.items()
             if isinstance(dtype, pd.CategoricalDtype)}
    return coded.astype(texts)


def _parse_coded(frame: pd.DataFrame, report: IngestReport) -> pd.DataFrame:
    """`parse`, its text columns left as categoricals: the load hashes and encodes each distinct text once."""
    parsed = pd.DataFrame(index=frame.index)
    parsed["invoice_no"] = _each_distinct(frame["invoice_no"], _stripped)
    parsed["stock_code"] = _each_distinct(frame["stock_code"], _stripped)
    parsed["description"] = _each_distinct(frame["description"], _stripped)
    parsed["quantity"] = _each_distinct(frame["quantity"], _number)
    parsed["unit_price"] = _each_distinct(frame["unit_price"], _number)
    customer = _each_distinct(frame["customer_id"], _number)
    parsed["customer_id"] = customer
    parsed["invoiced_at"] = _each_distinct(frame["invoiced_at"], _parse_dates)
    parsed["country"] = _each_distinct(frame["country"], lambda values: values.fillna("Unknown").str.strip())

    bad = (
        parsed[["quantity", "unit_price", "customer_id", "invoiced_at"]].isna().any(axis=1)
        | (parsed["quantity"] % 1 != 0)
        | (customer % 1 != 0)
        | (customer <= 0)
        | (parsed["quantity"].abs() > 2**31 - 1)
        | (parsed["unit_price"].abs() >= 1e9)
        | (parsed["stock_code"] == "")
        | (parsed["description"] == "")
        | (parsed["invoice_no"] == "")
    )
    report.rows_rejected = int(bad.sum())
    if report.rows_rejected:
        report.rejected_examples = (
            frame[bad].head(5).astype(object).where(frame[bad].head(5).notna(), None).to_dict("records")
        )
        log.warning("%d row(s) could not be parsed and were rejected", report.rows_rejected)
    good = parsed[~bad].copy()
    good["quantity"] = good["quantity"].astype("int64")
    good["customer_id"] = good["customer_id"].astype("int64")
    return good


def _each_distinct(values: pd.Series, convert: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """`convert(values)`, computed once per distinct value: a column repeats a few thousand values in 400k rows.

    Texts come back as a categorical (equal texts after conversion share a code), numbers and times as such.
    """
    codes, distinct = pd.factorize(values, use_na_sentinel=False)
    if isinstance(distinct, pd.CategoricalIndex):  # cleaned columns: the texts themselves, as read
        distinct = distinct.astype(distinct.categories.dtype)
    converted = convert(pd.Series(distinct))
    if pd.api.types.is_string_dtype(converted.dtype):
        recoded, texts = pd.factorize(converted)
        return pd.Series(pd.Categorical.from_codes(recoded[codes], texts), index=values.index)
    converted = converted.take(codes)
    converted.index = values.index
    return converted


def _stripped(values: pd.Series) -> pd.Series:
    return values.str.strip()


def _number(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.str.strip(), errors="coerce")


def _parse_dates(values: pd.Series) -> pd.Series:
    stripped = values.str.strip()
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
    for fmt in DATE_FORMATS:
        missing = result.isna()
        if not missing.any():
            break
        result[missing] = pd.to_datetime(stripped[missing], format=fmt, errors="coerce")
    return result


def ingest_file(
    path: Path | str,
    settings: Settings,
    progress: ProgressCallback | None = None,
) -> IngestReport:
    """Read, clean, parse and bulk-load one file; record the run; refresh derived data."""
    path = Path(path)
    step = progress or (lambda _stage: None)
    started = time.perf_counter()
    report = IngestReport(source=str(path))
    engine = get_engine(settings)
    if path.is_file():
        report.sha256 = file_sha256(path)
        if _record_if_loaded_before(engine, report, started):
            return report

    frame = read_transactions(path)
    step("read")
    cleaned = clean(frame, report)
    step("clean")
    rows = _parse_coded(cleaned, report)
    step("parse")
    if rows.empty and report.rows_rejected:
        example = report.rejected_examples[0] if report.rejected_examples else {}
        raise IngestError(
            f"all {report.rows_rejected:,} rows left after cleaning were rejected (first: {example}); "
            "nothing was loaded or recorded"
        )

    with engine.begin() as conn:
        report.run_id = conn.execute(
            text("INSERT INTO ingest_runs (source, status) VALUES (:source, 'running') RETURNING id"),
            {"source": str(path)},
        ).scalar_one()
    try:
        with engine.begin() as conn:
            _load(conn, rows, report, step)
            report.seconds = _seconds_without_rebuild(started, report)
            # A run that adds no purchase leaves the catalog version (latest succeeded run) and the cache as they were.
            _finish_run(conn, report, "succeeded" if report.rows_new else "unchanged")
    except Exception as exc:
        report.seconds = time.perf_counter() - started
        with engine.begin() as conn:
            _finish_run(conn, report, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    log.info(
        "ingested %s: %d read, %d loaded (%d new), %d rejected in %.1f s",
        path, report.rows_read, report.rows_loaded, report.rows_new, report.rows_rejected, report.seconds,
    )
    return report


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _record_if_loaded_before(engine, report: IngestReport, started: float) -> bool:
    """When a succeeded run loaded these same bytes, record this run with its counts (nothing new) and say so."""
    with engine.begin() as conn:
        earlier = conn.execute(
            text(
                """
                SELECT id, rows_read, rows_rejected, rows_loaded, details FROM ingest_runs
                WHERE status = 'succeeded' AND details ->> 'sha256' = :sha256
                  AND EXISTS (SELECT 1 FROM purchases)
                ORDER BY id DESC LIMIT 1
                """
            ),
            {"sha256": report.sha256},
        ).one_or_none()
        if earlier is None:
            return False
        details = earlier.details or {}
        report.unchanged_since_run = earlier.id
        report.rows_read, report.rows_rejected, report.rows_loaded = (
            earlier.rows_read, earlier.rows_rejected, earlier.rows_loaded)
        report.rows_with_nulls = details.get("rows_with_nulls", 0)
        report.duplicate_rows = details.get("duplicate_rows", 0)
        report.cancelled_rows = details.get("cancelled_rows", 0)
        report.rejected_examples = details.get("rejected_examples", [])
        report.copurchase_mode = "unchanged"
        report.purchases_total = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
        report.customers_total = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
        report.products_total = conn.execute(text("SELECT count(*) FROM products")).scalar_one()
        report.run_id = conn.execute(
            text("INSERT INTO ingest_runs (source, status) VALUES (:source, 'running') RETURNING id"),
            {"source": report.source},
        ).scalar_one()
        report.seconds = time.perf_counter() - started
        _finish_run(conn, report, "unchanged")  # not "succeeded": the catalog version and the cache stay
    log.info("%s was loaded by run %d already: nothing new", report.source, earlier.id)
    return True


def _seconds_without_rebuild(started: float, report: IngestReport) -> float:
    """The run's time; a full co-purchase rebuild (first load) is reported apart, in copurchase_refresh_seconds."""
    spent = time.perf_counter() - started
    return spent - report.copurchase_refresh_seconds if report.copurchase_mode == "rebuilt" else spent


_INSERT_PURCHASES = """
    INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description,
                           quantity, unit_price, invoiced_at, country)
"""
_HASHED_STAGING = """
    SELECT decode(md5(concat_ws('|', invoice_no, stock_code, description, quantity,
                                unit_price, invoiced_at, customer_id, country)), 'hex') AS row_hash,
           invoice_no, stock_code, customer_id, description, quantity, unit_price, invoiced_at, country
    FROM staging_purchases
"""
# A row loaded before (same hash) is skipped: the unique index decides.
_NEW_ROWS = f"{_HASHED_STAGING} ON CONFLICT (row_hash) DO NOTHING"
# A first load has no index to decide with: one row per hash (rows equal once trimmed collapse, as before).
_FIRST_LOAD_ROWS = f"SELECT DISTINCT ON (row_hash) * FROM ({_HASHED_STAGING}) hashed"


def _load(conn: Connection, rows: pd.DataFrame, report: IngestReport, step: ProgressCallback) -> None:
    first_load = not conn.execute(text("SELECT EXISTS (SELECT 1 FROM purchases)")).scalar_one()
    defer_counting(conn)
    aggregated = False
    if first_load and _hashes_match_this_session(conn):
        report.rows_new, aggregated = _first_load(conn, rows, report, step)
    else:
        _load_through_staging(conn, rows, report, step, first_load)
    step("insert")
    if not report.rows_new:  # nothing new: aggregates and co-purchase counts stay as they are
        report.copurchase_mode = "unchanged"
        report.purchases_total = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
        report.customers_total = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
        report.products_total = conn.execute(text("SELECT count(*) FROM products")).scalar_one()
        return
    if not aggregated:
        refresh_aggregates(conn)
    step("aggregate")
    report.purchases_total = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
    copurchase_started = time.perf_counter()
    many_new = report.rows_new >= REBUILD_MIN_ROWS and report.rows_new > REBUILD_SHARE * report.purchases_total
    if first_load or many_new:
        rebuild_copurchase(conn)
        report.copurchase_mode = "rebuilt"
    else:
        count_new_purchases(conn, "new_purchase_ids")
    report.copurchase_refresh_seconds = time.perf_counter() - copurchase_started
    step("copurchase")
    report.customers_total = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
    report.products_total = conn.execute(text("SELECT count(*) FROM products")).scalar_one()


def _load_through_staging(
    conn: Connection, rows: pd.DataFrame, report: IngestReport, step: ProgressCallback, first_load: bool
) -> None:
    """COPY the rows into a staging table; hash them in SQL and insert the ones not loaded before."""
    conn.execute(
        text(
            """
            CREATE TEMP TABLE staging_purchases (
                invoice_no text, stock_code text, description text, quantity integer,
                unit_price numeric(12, 3), invoiced_at timestamp, customer_id bigint, country text
            ) ON COMMIT DROP
            """
        )
    )
    _copy_frame(conn, rows)
    report.rows_loaded = len(rows)
    step("copy")
    conn.execute(
        text(
            """
            INSERT INTO products (stock_code, description)
            SELECT DISTINCT ON (stock_code) stock_code, description FROM staging_purchases
            ORDER BY stock_code
            ON CONFLICT (stock_code) DO NOTHING
            """
        )
    )
    conn.execute(
        text(
            """
            INSERT INTO customers (customer_id, country)
            SELECT DISTINCT ON (customer_id) customer_id, country FROM staging_purchases
            ORDER BY customer_id, invoiced_at DESC
            ON CONFLICT (customer_id) DO NOTHING
            """
        )
    )
    if first_load:
        # Into an empty table: its indexes and foreign keys are built once after the load, not row by row.
        with indexes_rebuilt_after(conn, "purchases"):
            report.rows_new = conn.execute(text(f"{_INSERT_PURCHASES} {_FIRST_LOAD_ROWS}")).rowcount
    else:
        conn.execute(text("CREATE TEMP TABLE new_purchase_ids (id bigint) ON COMMIT DROP"))
        insert = f"{_INSERT_PURCHASES} {_NEW_ROWS}"
        report.rows_new = conn.execute(
            text(f"WITH inserted AS ({insert} RETURNING id) INSERT INTO new_purchase_ids SELECT id FROM inserted")
        ).rowcount


def _copy_frame(conn: Connection, rows: pd.DataFrame) -> None:
    """COPY the parsed rows in CSV form through psycopg's copy protocol."""
    columns = ["invoice_no", "stock_code", "description", "quantity", "unit_price", "invoiced_at", "customer_id",
               "country"]
    raw = conn.connection.driver_connection
    chunk = 100_000
    # Timestamps formatted by one vectorised strftime: to_csv formats them value by value (4x slower).
    text_rows = rows[columns].assign(invoiced_at=rows["invoiced_at"].dt.strftime(TIMESTAMP_TEXT))
    with raw.cursor() as cur, cur.copy(
        f"COPY staging_purchases ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
    ) as copy:
        for start in range(0, len(text_rows), chunk):
            buffer = io.StringIO()
            text_rows.iloc[start:start + chunk].to_csv(buffer, header=False, index=False)
            copy.write(buffer.getvalue())


def _hashes_match_this_session(conn: Connection) -> bool:
    """Whether row hashes computed in Python equal the SQL ones here: ISO timestamps, UTF-8 text both ways."""
    return conn.execute(
        text(
            "SELECT current_setting('DateStyle') LIKE 'ISO%' AND current_setting('server_encoding') = 'UTF8' "
            "AND current_setting('client_encoding') = 'UTF8'"
        )
    ).scalar_one()


def _first_load(
    conn: Connection, rows: pd.DataFrame, report: IngestReport, step: ProgressCallback
) -> tuple[int, bool]:
    """Into an empty purchases table: no staging table, no 400k-row sorts in SQL.

    The purchases are hashed here and COPied straight in, one row per hash, in hash order: the order the
    staging path's DISTINCT ON inserted them in, so ids and the table's layout are what they were. Indexes
    and foreign keys are built once after the rows. Into an empty catalog, products and customers are
    inserted with what refresh_aggregates would set, worked out from the loaded rows, instead of being
    updated from 400k purchases afterwards. Returns how many rows were loaded and whether the aggregates
    are set.
    """
    catalog_empty = not conn.execute(
        text("SELECT EXISTS (SELECT 1 FROM products) OR EXISTS (SELECT 1 FROM customers)")
    ).scalar_one()
    if not catalog_empty:
        _insert_products_and_customers(conn, rows)
    with indexes_rebuilt_after(conn, "purchases"):
        with _hashed_purchases_copied(conn, rows) as loaded:
            report.rows_loaded = len(rows)
            catalog = _aggregated_catalog(rows, loaded) if catalog_empty else None  # while Postgres reads
        step("copy")
        if catalog is not None:  # the foreign keys are checked when the block ends, after these rows are in
            _insert_aggregated_catalog(conn, catalog)
    return len(loaded), catalog_empty


def _insert_products_and_customers(conn: Connection, rows: pd.DataFrame) -> None:
    """The products and customers the staging path inserts, taken from the frame.

    A product's description is a placeholder until refresh_aggregates sets the canonical one.
    """
    products = rows.drop_duplicates("stock_code")
    conn.execute(
        text(
            """
            INSERT INTO products (stock_code, description)
            SELECT * FROM unnest(CAST(:codes AS text[]), CAST(:descriptions AS text[])) ORDER BY 1
            ON CONFLICT (stock_code) DO NOTHING
            """
        ),
        {"codes": products["stock_code"].tolist(), "descriptions": products["description"].tolist()},
    )
    latest = _latest_purchase_of_each_customer(rows)
    conn.execute(
        text(
            """
            INSERT INTO customers (customer_id, country)
            SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:countries AS text[])) ORDER BY 1
            ON CONFLICT (customer_id) DO NOTHING
            """
        ),
        {"ids": latest["customer_id"].tolist(), "countries": _texts(latest["country"])},
    )


def _latest_purchase_of_each_customer(rows: pd.DataFrame) -> pd.DataFrame:
    """A customer's country is that of their latest purchase; where lines tie on time, the first in the file
    (the staging path took whichever its sort put first)."""
    return rows.loc[rows.groupby("customer_id")["invoiced_at"].idxmax()]


def _aggregated_catalog(rows: pd.DataFrame, loaded: np.ndarray) -> dict[str, dict]:
    """What refresh_aggregates sets on products and customers, from the rows at positions `loaded`: the
    parameters of _insert_aggregated_catalog's two statements.

    Counts, sums, first and last times are exact in pandas. The median price is Postgres's percentile_cont
    step for step over the float8 of each stored price. Which description is canonical is left to SQL over
    the (code, description, count) triples, so that ties are broken in the database's collation.
    """
    purchases = rows.iloc[loaded]
    code_ids, codes = pd.factorize(purchases["stock_code"])
    price_ids, prices = pd.factorize(purchases["unit_price"])
    stored_prices = np.array([float(shown) for shown in _numeric_texts(pd.Series(prices))])[price_ids]
    per_code = pd.DataFrame({
        "code": code_ids, "quantity": purchases["quantity"].to_numpy(),
        "customer": purchases["customer_id"].to_numpy(),
    }).groupby("code")
    lines = per_code.size().to_numpy()
    descriptions = purchases.groupby(["stock_code", "description"], observed=True, sort=False).size()
    per_customer = pd.DataFrame({
        "customer_id": purchases["customer_id"].to_numpy(), "at": purchases["invoiced_at"].to_numpy(),
    }).groupby("customer_id")["at"].agg(["size", "min", "max"])
    latest = _latest_purchase_of_each_customer(rows).set_index("customer_id")["country"]
    return {
        "products": {
            "pair_codes": _texts(descriptions.index.get_level_values("stock_code").to_series()),
            "pair_descriptions": _texts(descriptions.index.get_level_values("description").to_series()),
            "pair_lines": descriptions.tolist(),
            "codes": _texts(pd.Series(codes)),
            "purchase_counts": lines.tolist(),
            "quantity_totals": per_code["quantity"].sum().tolist(),
            "customer_counts": per_code["customer"].nunique().tolist(),
            "prices": _percentile_cont_median(code_ids, stored_prices, lines).tolist(),
            **_NON_PRODUCT_PARAMETERS,
        },
        "customers": {
            "ids": per_customer.index.tolist(),
            "countries": _texts(latest.reindex(per_customer.index)),
            "counts": per_customer["size"].tolist(),
            "firsts": per_customer["min"].dt.to_pydatetime().tolist(),
            "lasts": per_customer["max"].dt.to_pydatetime().tolist(),
        },
    }


def _insert_aggregated_catalog(conn: Connection, catalog: dict[str, dict]) -> None:
    """Insert products and customers, aggregates set, from what _aggregated_catalog worked out."""
    conn.execute(
        text(
            f"""
            INSERT INTO products (stock_code, description, purchase_count, quantity_total, customer_count, price,
                                  is_non_product)
            SELECT stock_code, description, purchase_count, quantity_total, customer_count, price, {_IS_NON_PRODUCT}
            FROM (
                SELECT DISTINCT ON (d.stock_code) d.stock_code, d.description, s.purchase_count, s.quantity_total,
                       s.customer_count, s.price
                FROM unnest(CAST(:pair_codes AS text[]), CAST(:pair_descriptions AS text[]),
                            CAST(:pair_lines AS bigint[])) AS d (stock_code, description, n)
                JOIN unnest(CAST(:codes AS text[]), CAST(:purchase_counts AS bigint[]),
                            CAST(:quantity_totals AS bigint[]), CAST(:customer_counts AS bigint[]),
                            CAST(:prices AS float8[])) AS s (stock_code, purchase_count, quantity_total,
                                                             customer_count, price)
                  ON s.stock_code = d.stock_code
                ORDER BY d.stock_code, d.n DESC, d.description
            ) canonical
            ORDER BY stock_code
            """
        ),
        catalog["products"],
    )
    conn.execute(
        text(
            """
            INSERT INTO customers (customer_id, country, purchase_count, first_purchase_at, last_purchase_at)
            SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:countries AS text[]), CAST(:counts AS integer[]),
                                 CAST(:firsts AS timestamp[]), CAST(:lasts AS timestamp[]))
            ORDER BY 1
            """
        ),
        catalog["customers"],
    )


def _percentile_cont_median(group_ids: np.ndarray, values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per group (ids 0..n-1, `sizes` rows each), percentile_cont(0.5) as Postgres computes it in float8:
    the rows at floor and ceil of 0.5 * (n - 1) in order, lo + (hi - lo) * the fraction between them."""
    ordered = values[np.lexsort((values, group_ids))]
    starts = np.cumsum(sizes) - sizes
    position = 0.5 * (sizes - 1)
    below, above = np.floor(position), np.ceil(position)
    low = ordered[starts + below.astype(np.intp)]
    high = ordered[starts + above.astype(np.intp)]
    return np.where(below == above, low, low + (high - low) * (position - below))


@contextmanager
def _hashed_purchases_copied(conn: Connection, rows: pd.DataFrame) -> Iterator[np.ndarray]:
    """COPY the rows into purchases (binary format), one per row hash, in hash order; yields their positions.

    The hashed text and the binary row are both the columns in one order, so each is assembled from a few
    pieces per row: consecutive columns whose combinations repeat (a code and its description, an invoice's
    time, customer and country) are worked out once per distinct combination. A writer thread sends each
    chunk of rows while the next is put together: a plain write returns only once Postgres has read most
    of the chunk, so assembling and storing would take turns. The block runs once every row is queued,
    while Postgres is still reading them; the COPY ends with it.
    """
    group_codes, hashed_parts, fields = [], [], []
    for columns in _COLUMN_GROUPS:
        codes, parts, column_fields = _group_parts_and_fields(rows, columns)
        group_codes.append(codes)
        hashed_parts.append(parts)
        fields.append(column_fields)
    join = b"".join
    row_parts = [parts[codes].tolist() for parts, codes in zip(hashed_parts, group_codes, strict=True)]
    digests = [_row_md5(join(pieces)).digest() for pieces in zip(*row_parts, strict=True)]
    in_hash_order = _first_of_each_hash_in_order(digests)
    digest_array = np.array(digests, dtype=object)
    first_id = _reserve_purchase_ids(conn, len(in_hash_order))
    row_head = _ROW_HEAD.pack
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(
        f"COPY purchases (id, row_hash, {', '.join(_HASHED_COLUMNS)}) FROM STDIN (FORMAT binary)",
        writer=QueuedLibpqWriter(cursor),
    ) as copy:
        copy.write(_BINARY_COPY_HEADER)
        for start in range(0, len(in_hash_order), _COPY_CHUNK_ROWS):
            positions = in_hash_order[start:start + _COPY_CHUNK_ROWS]
            first = first_id + start
            pieces = [[row_head(_ROW_FIELDS, 8, row_id, 16) for row_id in range(first, first + len(positions))],
                      digest_array[positions].tolist()]
            pieces += [group[codes[positions]].tolist() for group, codes in zip(fields, group_codes, strict=True)]
            copy.write(join(map(join, zip(*pieces, strict=True))))
        copy.write(_BINARY_COPY_TRAILER)
        yield in_hash_order


def _reserve_purchase_ids(conn: Connection, count: int) -> int:
    """The first of the `count` ids that inserting the rows one by one would draw from purchases' sequence.

    They are taken in one step (nextval, then setval to the last), leaving the sequence as `count` nextval
    calls would: the caller holds an exclusive lock on purchases, so no insert draws one meanwhile. A
    nextval per row was a quarter of Postgres's time in the COPY.
    """
    if not count:
        return 0
    return conn.execute(
        text(
            "SELECT setval(sequence, nextval(sequence) + :count - 1) - :count + 1 "
            "FROM CAST(pg_get_serial_sequence('purchases', 'id') AS regclass) AS sequence"
        ),
        {"count": count},
    ).scalar_one()


def _group_parts_and_fields(rows: pd.DataFrame, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, a code for its combination of these columns' values; per combination, its part of the hashed
    text (concat_ws: a separator before every column but the first, nothing for a NULL) and its binary COPY
    fields, worked out from the text Postgres prints for each stored value."""
    combined = np.zeros(len(rows), dtype=np.intp)
    per_column = []
    for column in columns:
        texts_of, binary_of = _HASHED_COLUMNS[column]
        codes, distinct = pd.factorize(rows[column])
        texts = texts_of(pd.Series(distinct))
        prefix = b"" if column == _FIRST_HASHED_COLUMN else b"|"
        parts = [b"" if shown is None else prefix + shown.encode() for shown in texts]
        column_fields = [_NULL_FIELD if shown is None else _field(binary_of(shown)) for shown in texts]
        per_column.append((codes, np.array(parts, dtype=object), np.array(column_fields, dtype=object)))
        combined, _ = pd.factorize(combined * len(distinct) + codes)  # stays below the row count: no overflow
    # factorize numbers combinations in order of appearance: a row is a combination's first where its code
    # exceeds every code before it
    first = np.ones(len(combined), dtype=bool)
    first[1:] = combined[1:] > np.maximum.accumulate(combined)[:-1]
    first_rows = np.flatnonzero(first)
    parts, group_fields = None, None
    for codes, texts, binary in per_column:  # object arrays: + concatenates the bytes element by element
        at = codes[first_rows]
        parts = texts[at] if parts is None else parts + texts[at]
        group_fields = binary[at] if group_fields is None else group_fields + binary[at]
    return combined, parts, group_fields


def _first_of_each_hash_in_order(digests: list[bytes]) -> np.ndarray:
    """Row positions sorted by hash (bytea order), the first row of equal hashes only (as DISTINCT ON keeps one).

    A stable sort on the first 8 bytes is the whole order unless two different hashes share them (a 2**-64
    chance a pair); only then are the last 8 bytes sorted too.
    """
    if not digests:
        return np.empty(0, dtype=np.intp)
    halves = np.frombuffer(b"".join(digests), dtype=">u8").reshape(-1, 2).astype(np.uint64)
    order = np.argsort(halves[:, 0], kind="stable")
    sorted_halves = halves[order]
    same_start = sorted_halves[1:, 0] == sorted_halves[:-1, 0]
    if (same_start & (sorted_halves[1:, 1] != sorted_halves[:-1, 1])).any():
        order = np.lexsort((halves[:, 1], halves[:, 0]))
        sorted_halves = halves[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (sorted_halves[1:] != sorted_halves[:-1]).any(axis=1)
    return order[first]


def _field(value: bytes) -> bytes:
    return struct.pack(">i", len(value)) + value


def _texts(values: pd.Series) -> list[str | None]:
    """Text as stored; empty is NULL (the CSV staging round trip made it so)."""
    return [value or None for value in values.tolist()]


def _integer_texts(values: pd.Series) -> list[str]:
    return [str(value) for value in values.tolist()]


def _numeric_texts(values: pd.Series) -> list[str]:
    """numeric(12, 3) as Postgres prints it for the float text the staging path sent (to_csv: numpy's str).

    Postgres rounds that decimal to 3 places half away from zero and prints no negative zero.
    """
    texts = []
    for sent in values.to_numpy(dtype="float64").astype(str):
        rounded = Decimal(sent).quantize(_NUMERIC_SCALE, rounding=ROUND_HALF_UP)
        texts.append(format(rounded.copy_abs() if rounded.is_zero() else rounded, "f"))
    return texts


def _timestamp_texts(values: pd.Series) -> list[str]:
    return values.dt.strftime(TIMESTAMP_TEXT).tolist()


def _utf8(value: str) -> bytes:
    return value.encode()


def _int4(value: str) -> bytes:
    return struct.pack(">i", int(value))


def _int8(value: str) -> bytes:
    return struct.pack(">q", int(value))


def _numeric(value: str) -> bytes:
    return bytes(_DECIMAL_DUMPER.dump(Decimal(value)))


def _timestamp(value: str) -> bytes:
    """Microseconds since 2000-01-01, Postgres's binary timestamp."""
    return struct.pack(">q", (datetime.fromisoformat(value) - _POSTGRES_EPOCH) // timedelta(microseconds=1))


# The row hash's columns in concat_ws order: how Postgres prints each stored value, and its binary form.
_HASHED_COLUMNS: dict[str, tuple[Callable[[pd.Series], list], Callable[[str], bytes]]] = {
    "invoice_no": (_texts, _utf8),
    "stock_code": (_texts, _utf8),
    "description": (_texts, _utf8),
    "quantity": (_integer_texts, _int4),
    "unit_price": (_numeric_texts, _numeric),
    "invoiced_at": (_timestamp_texts, _timestamp),
    "customer_id": (_integer_texts, _int8),
    "country": (_texts, _utf8),
}
# The hashed columns in runs whose value combinations repeat; together, in order, they are _HASHED_COLUMNS.
_COLUMN_GROUPS = (
    ("invoice_no",), ("stock_code", "description"), ("quantity", "unit_price"),
    ("invoiced_at", "customer_id", "country"),
)
_FIRST_HASHED_COLUMN = next(iter(_HASHED_COLUMNS))
_NUMERIC_SCALE = Decimal("0.001")
_DECIMAL_DUMPER = psycopg.adapters.get_dumper(Decimal, PyFormat.BINARY)(Decimal)
_POSTGRES_EPOCH = datetime(2000, 1, 1)
_NULL_FIELD = struct.pack(">i", -1)
# A row's first bytes: its field count, the id's length and value, the 16-byte hash's length.
_ROW_HEAD = struct.Struct(">hiqi")
_ROW_FIELDS = 2 + len(_HASHED_COLUMNS)
_BINARY_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_BINARY_COPY_TRAILER = struct.pack(">h", -1)
_COPY_CHUNK_ROWS = 10_000


# is_non_product in SQL, over a column named stock_code (is_non_product() above says the same in Python).
_IS_NON_PRODUCT = "stock_code = ANY(:non_product_codes) OR stock_code LIKE ANY(:non_product_patterns)"
_NON_PRODUCT_PARAMETERS = {
    "non_product_codes": sorted(NON_PRODUCT_CODES),
    "non_product_patterns": [f"{prefix}%" for prefix in NON_PRODUCT_PREFIXES],
}


def refresh_aggregates(conn: Connection) -> None:
    """Recompute what products and customers derive from purchases.

    The canonical description is the one used most often for a code (ties: alphabetical);
    when it changes, the stale embedding is cleared so `recsys embed` redoes it. The per-code statistics
    group by the code's bytes (COLLATE "C": the same groups, as the default collation is deterministic),
    which sorts 400k lines several times faster than the locale's collation.
    """
    conn.execute(
        text(
            """
            WITH description_counts AS (
                SELECT stock_code, description, count(*) AS n
                FROM purchases GROUP BY stock_code, description
            ), canonical AS (
                SELECT DISTINCT ON (stock_code) stock_code, description
                FROM description_counts ORDER BY stock_code, n DESC, description
            ), stats AS (
                SELECT stock_code COLLATE "C" AS stock_code,
                       count(*) AS purchase_count,
                       sum(quantity) AS quantity_total,
                       count(DISTINCT customer_id) AS customer_count,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY unit_price) AS price
                FROM purchases GROUP BY stock_code COLLATE "C"
            )
            UPDATE products p SET
                description = c.description,
                purchase_count = s.purchase_count,
                quantity_total = s.quantity_total,
                customer_count = s.customer_count,
                price = s.price,
                embedding = CASE WHEN p.description = c.description THEN p.embedding END,
                embedding_model = CASE WHEN p.description = c.description THEN p.embedding_model END,
                updated_at = now()
            FROM canonical c JOIN stats s ON s.stock_code = c.stock_code COLLATE "C"
            WHERE p.stock_code = c.stock_code
            """
        )
    )
    conn.execute(text(f"UPDATE products SET is_non_product = ({_IS_NON_PRODUCT})"), _NON_PRODUCT_PARAMETERS)
    conn.execute(
        text(
            """
            UPDATE customers c SET
                purchase_count = s.n, first_purchase_at = s.first_at, last_purchase_at = s.last_at
            FROM (SELECT customer_id, count(*) AS n, min(invoiced_at) AS first_at, max(invoiced_at) AS last_at
                  FROM purchases GROUP BY customer_id) s
            WHERE c.customer_id = s.customer_id
            """
        )
    )


def _finish_run(conn: Connection, report: IngestReport, status: str, error: str | None = None) -> None:
    details = {
        "rows_with_nulls": report.rows_with_nulls,
        "duplicate_rows": report.duplicate_rows,
        "cancelled_rows": report.cancelled_rows,
        "rejected_examples": report.rejected_examples,
        "sha256": report.sha256,
        "unchanged_since_run": report.unchanged_since_run,
    }
    conn.execute(
        text(
            """
            UPDATE ingest_runs SET status = :status, rows_read = :read, rows_rejected = :rejected,
                rows_cleaned_out = :cleaned, rows_loaded = :loaded, rows_new = :new, seconds = :seconds,
                details = CAST(:details AS jsonb), error = :error, finished_at = now()
            WHERE id = :id
            """
        ),
        {
            "status": status, "read": report.rows_read, "rejected": report.rows_rejected,
            "cleaned": report.rows_cleaned_out, "loaded": report.rows_loaded, "new": report.rows_new,
            "seconds": report.seconds, "details": _json(details), "error": error, "id": report.run_id,
        },
    )


def _json(value) -> str:
    import json

    return json.dumps(value, default=str)
