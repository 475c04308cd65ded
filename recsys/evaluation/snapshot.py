"""A snapshot database: the live database as it was before a cutoff, for evaluation and training.

The snapshot holds only the purchases before the cutoff, loaded through the real ingest (the
same cleaning, products, customers and aggregates, the `copurchase` view refreshed), with the
embeddings copied from the source database for every product whose canonical description is the
same (any other is embedded afresh). Products first sold on or after the cutoff do not exist in
it. Pointing `Settings` at it makes every production code path — candidates, rankers, statistics
— see the shop as it was, so nothing after the cutoff can leak in.

A snapshot is a database on the same server named after the source and the cutoff; it is built
once and reused while the source has the same purchases before the cutoff, the same latest ingest
and the same embedding model (a fingerprint kept as the database's comment).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from recsys.config import Settings
from recsys.platform.db import database_url, get_engine

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
ONLINE_RETAIL_COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
                         "CustomerID", "Country")

Progress = Callable[[str], None]


class SnapshotError(ValueError):
    """No snapshot can be built for this cutoff (the message is one line for the user)."""


def snapshot_name(settings: Settings, cutoff: datetime) -> str:
    """The snapshot database's name: the source's name and the cutoff (at most 63 characters)."""
    source = _source_database(settings)
    suffix = f"_before_{cutoff:%Y%m%dT%H%M%S}"
    return source[: 63 - len(suffix)] + suffix


def _source_database(settings: Settings) -> str:
    if settings.database_url:
        return make_url(settings.sqlalchemy_url).database or "postgres"
    return settings.db_name


def settings_for(settings: Settings, name: str) -> Settings:
    """The same settings pointing at database `name` on the same server."""
    if settings.database_url:
        url = make_url(settings.sqlalchemy_url).set(database=name)
        return settings.with_(database_url=url.render_as_string(hide_password=False))
    return settings.with_(db_name=name)


def _admin_engine(settings: Settings):
    """An autocommit engine on the server's `postgres` database (CREATE/DROP DATABASE run outside transactions)."""
    return create_engine(database_url(settings_for(settings, "postgres")), isolation_level="AUTOCOMMIT")


def fingerprint(settings: Settings, cutoff: datetime) -> dict:
    """What the snapshot must match to be reused: the source's purchases before the cutoff, its latest
    ingest, the embedding model and this builder."""
    with get_engine(settings).connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT count(*) AS purchases, max(id) AS newest, min(invoiced_at) AS first_at,
                       (SELECT max(id) FROM ingest_runs WHERE status = 'succeeded') AS ingest_run
                FROM purchases WHERE invoiced_at < :cutoff
                """
            ),
            {"cutoff": cutoff},
        ).one()
    return {
        "builder": BUILDER_VERSION,
        "source": _source_database(settings),
        "cutoff": cutoff.isoformat(sep=" "),
        "purchases": row.purchases,
        "newest_purchase_id": row.newest,
        "first_purchase_at": row.first_at.isoformat(sep=" ") if row.first_at else None,
        "ingest_run": row.ingest_run,
        "embedding_model": settings.embedding_model,
    }


def snapshot_settings(settings: Settings, cutoff: datetime, progress: Progress | None = None) -> Settings:
    """Settings pointing at a database that holds only the purchases before `cutoff` (built or reused)."""
    step = progress or (lambda _message: None)
    cutoff = _as_datetime(cutoff)
    wanted = fingerprint(settings, cutoff)
    if not wanted["purchases"]:
        raise SnapshotError(f"no purchases before {cutoff:%Y-%m-%d %H:%M}: nothing to build a snapshot from")
    name = snapshot_name(settings, cutoff)
    if name == _source_database(settings):
        raise SnapshotError(f"the snapshot's name {name!r} is the source database's")
    target = settings_for(settings, name)
    admin = _admin_engine(settings)
    lock_key = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": lock_key})
            try:
                if _comment(conn, name) == wanted:
                    log.info("reusing snapshot %s", name)
                    # its rows still match; its schema and SQL functions follow the code (a no-op at the head)
                    from recsys.platform.migrations import upgrade

                    upgrade(target)
                    return target
                step(f"building snapshot {name}")
                started = time.perf_counter()
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
                try:
                    _fill(settings, target, cutoff, step)
                except BaseException:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    raise
                comment = json.dumps(wanted, sort_keys=True).replace("'", "''")
                conn.execute(text(f"COMMENT ON DATABASE \"{name}\" IS '{comment}'"))
                log.info("built snapshot %s (%d purchases before %s) in %.1f s", name, wanted["purchases"],
                         wanted["cutoff"], time.perf_counter() - started)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key})
    finally:
        admin.dispose()
    return target


def _as_datetime(value: datetime | str) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise SnapshotError(f"cutoff must be a date like 2011-11-01, got {value!r}") from exc


def _comment(conn, name: str) -> dict | None:
    raw = conn.execute(
        text("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = :name"),
        {"name": name},
    ).scalar_one_or_none()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _fill(source: Settings, target: Settings, cutoff: datetime, step: Progress) -> None:
    """Migrate, ingest the purchases before the cutoff as an Online Retail file, copy embeddings."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file
    from recsys.platform.migrations import upgrade

    upgrade(target)
    step("migrated")
    with tempfile.TemporaryDirectory(prefix="recsys-snapshot-") as folder:
        path = Path(folder) / f"purchases_before_{cutoff:%Y%m%d}.csv.gz"
        rows = _export_purchases(source, cutoff, path)
        step(f"exported {rows:,} purchases")
        ingest_file(path, target)
    step("ingested")
    copied = _copy_embeddings(source, target)
    step(f"copied {copied:,} embeddings")
    report = embed_products(target)
    if report.embedded:
        step(f"embedded {report.embedded:,} products whose description differs before the cutoff")


def _export_purchases(settings: Settings, cutoff: datetime, path: Path) -> int:
    """The purchases before the cutoff in the Online Retail layout (what `recsys ingest` reads)."""
    raw_engine = get_engine(settings)
    count = 0
    with raw_engine.connect() as conn, gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ONLINE_RETAIL_COLUMNS)
        result = conn.execution_options(stream_results=True, max_row_buffer=20_000).execute(
            text(
                """
                SELECT invoice_no, stock_code, description, quantity,
                       to_char(invoiced_at, 'YYYY-MM-DD HH24:MI:SS') AS invoiced_at, unit_price, customer_id, country
                FROM purchases WHERE invoiced_at < :cutoff ORDER BY id
                """
            ),
            {"cutoff": cutoff},
        )
        for row in result:
            writer.writerow(row)
            count += 1
    return count


def _copy_embeddings(source: Settings, target: Settings) -> int:
    """Copy each product's embedding where the snapshot's description is the source's (one COPY)."""
    with get_engine(source).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT stock_code, description, CAST(embedding AS text) AS embedding, embedding_model, embedded_at "
                "FROM products WHERE embedding IS NOT NULL"
            )
        ).all()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([row.stock_code, row.description, row.embedding, row.embedding_model,
                         row.embedded_at.isoformat() if row.embedded_at else None])
    with get_engine(target).begin() as conn:
        conn.execute(
            text(
                "CREATE TEMP TABLE source_embeddings (stock_code text, description text, embedding text, "
                "embedding_model text, embedded_at timestamptz) ON COMMIT DROP"
            )
        )
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy("COPY source_embeddings FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write(buffer.getvalue())
        return conn.execute(
            text(
                """
                UPDATE products p SET embedding = CAST(s.embedding AS vector), embedding_model = s.embedding_model,
                       embedded_at = s.embedded_at
                FROM source_embeddings s
                WHERE p.stock_code = s.stock_code AND p.description = s.description
                """
            )
        ).rowcount
