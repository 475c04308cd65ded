"""What the benchmarks share: a free loopback port and a scratch database loaded with the bundled file."""

from __future__ import annotations

import socket
import sys

from sqlalchemy import text

from recsys import migrate, services
from recsys.config import Settings
from recsys.db import get_engine

DATA = "data/online_retail.csv.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loaded_database(settings: Settings, name: str) -> Settings:
    """The bench database `name`, migrated, and loaded once (ingest + embed of the bundled file)."""
    from recsys.embedding import embed_products
    from recsys.ingest import ingest_file

    bench = settings.with_(db_name=name) if settings.uses_embedded_db else settings
    if bench.uses_embedded_db:
        services.start_postgres(bench)
    migrate.upgrade(bench)
    with get_engine(bench).connect() as conn:
        purchases = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
    if purchases == 0:
        print(f"loading {DATA} into {name} (first run only) ...", file=sys.stderr)
        ingest_file(DATA, bench)
    embed_products(bench)
    return bench


def clear_jobs(settings: Settings) -> None:
    with get_engine(settings).begin() as conn:
        conn.execute(text("DELETE FROM jobs"))
        conn.execute(text("DELETE FROM result_cache"))
