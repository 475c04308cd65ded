"""Ingest and embedding throughput on the bundled file, into a scratch database. Prints JSON.

    python bench/ingest.py [--path data/online_retail.csv.gz] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

from sqlalchemy import create_engine, text

from recsys.catalog.embedding import embed_products, load_model
from recsys.catalog.ingest import ingest_file
from recsys.config import Settings
from recsys.platform import embedded, migrations
from recsys.platform.db import database_url, dispose_engines, get_engine

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def recreate(settings: Settings, name: str) -> Settings:
    dispose_engines()
    admin = create_engine(database_url(settings.with_(db_name="postgres")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    scratch = settings.with_(db_name=name)
    migrations.upgrade(scratch)
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="data/online_retail.csv.gz")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = Settings.from_env()
    if settings.uses_embedded_db:
        embedded.start_postgres(settings)
    ingest_seconds, embed_seconds, reingest_seconds, refresh_seconds = [], [], [], []
    report = embed_report = None
    load_model(settings.embedding_model)
    for _ in range(args.repeats):
        scratch = recreate(settings, "recsys_bench_ingest")
        report = ingest_file(args.path, scratch)
        ingest_seconds.append(report.seconds)
        refresh_seconds.append(report.copurchase_refresh_seconds)
        reingest_seconds.append(ingest_file(args.path, scratch).seconds)
        started = time.perf_counter()
        embed_report = embed_products(scratch)
        embed_seconds.append(time.perf_counter() - started)
    with get_engine(scratch).connect() as conn:
        purchases = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
    dispose_engines()
    recreate(settings, "recsys_bench_ingest")
    print(json.dumps({
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "file": args.path,
        "rows_read": report.rows_read,
        "purchases": purchases,
        "customers": report.customers_total,
        "ingest_seconds_median": round(statistics.median(ingest_seconds), 2),
        "ingest_seconds_all": [round(s, 2) for s in ingest_seconds],
        "rows_per_second": round(report.rows_read / statistics.median(ingest_seconds)),
        "reingest_seconds_median": round(statistics.median(reingest_seconds), 2),
        "copurchase_refresh_seconds_median": round(statistics.median(refresh_seconds), 2),
        "embedding_model": embed_report.model,
        "products_embedded": embed_report.embedded,
        "embed_seconds_median": round(statistics.median(embed_seconds), 2),
        "products_per_second": round(embed_report.embedded / statistics.median(embed_seconds), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
