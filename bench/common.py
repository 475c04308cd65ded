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


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads by native id; 0 once it is gone."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """A process and its direct children (a gunicorn master and its workers, a Celery worker and its pool)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(child) for child in children)]


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two {pid: cpu_seconds} snapshots; a process that started in between counts from 0."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of this machine has spent busy since boot (/proc/stat: all but idle and iowait);
    None where /proc/stat cannot be read."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle, iowait = fields[3], fields[4]
    return (sum(fields) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def database_backends(database: str) -> list[int]:
    """The local Postgres backends serving `database` (the embedded server is shared with other databases)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"postgres: ") and f" {database} ".encode() in cmdline:
                pids.append(int(entry.name))
    return pids


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


KEPT_JOBS_WORKER = "bench-kept"


def clear_jobs(settings: Settings, *, keep_old: bool = False) -> None:
    """Delete the jobs and cached answers; `keep_old` keeps the finished jobs `keep_old_jobs` inserted."""
    with get_engine(settings).begin() as conn:
        if keep_old:
            conn.execute(text("DELETE FROM jobs WHERE worker IS DISTINCT FROM :kept"), {"kept": KEPT_JOBS_WORKER})
        else:
            conn.execute(text("DELETE FROM jobs"))
        conn.execute(text("DELETE FROM result_cache"))
    if keep_old:
        with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (ANALYZE) jobs"))


def keep_old_jobs(settings: Settings, count: int) -> None:
    """`count` jobs finished weeks ago (60 days back, one a second), as a deployment keeps them until
    `recsys jobs cleanup`.

    Their results are left out (a real one is ~6 KB of JSON: a million would be gigabytes); what the job
    statements' plans see is the number of rows and the finished_at index.
    """
    clear_jobs(settings)
    if count <= 0:
        return
    with get_engine(settings).begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO jobs (id, kind, status, request, attempts, worker, created_at, started_at,
                                  finished_at, updated_at)
                SELECT gen_random_uuid(), 'recommendation', 'succeeded',
                       jsonb_build_object('customer_id', 12347, 'query', 'kept ' || g, 'k', 10), 1, :kept,
                       at, at, at + interval '3 seconds', at + interval '3 seconds'
                FROM generate_series(1, :count) AS g
                CROSS JOIN LATERAL (SELECT now() - interval '60 days' + make_interval(secs => g) AS at) t
                """
            ),
            {"count": count, "kept": KEPT_JOBS_WORKER},
        )
    clear_jobs(settings, keep_old=True)
