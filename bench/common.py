"""What the benchmarks share: a free loopback port, a scratch database loaded with the bundled file, and the
machine description (CPU model, cores, load average) every figure is reported with."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

from sqlalchemy import text

from recsys.config import Settings
from recsys.platform import embedded, migrations
from recsys.platform.db import get_engine

DATA = "data/online_retail.csv.gz"
# The helpers tests and benchmarks share (tiny models, worker processes) live in tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what `grep -m1 'model name' /proc/cpuinfo` prints)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict:
    """Where a figure was measured: the cores are shared, so the load average goes with every figure."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": load_average()}


def ratio(system: float | None, baseline: float | None, digits: int = 3) -> float | None:
    """system / baseline, the figure each goal is stated in."""
    if not system or not baseline:
        return None
    return round(system / baseline, digits)


def loaded_database(settings: Settings, name: str) -> Settings:
    """The bench database `name`, migrated, and loaded once (ingest + embed of the bundled file)."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file

    bench = settings.with_(db_name=name) if settings.uses_embedded_db else settings
    if bench.uses_embedded_db:
        embedded.start_postgres(bench)
    migrations.upgrade(bench)
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
