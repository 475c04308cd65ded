"""External services named by DATABASE_URL and CELERY_BROKER_URL: recsys starts nothing of its own,
and a server without pgvector or a broker that does not answer stops a command with one line and
exit code 1 before anything is started. These run in every session (against the session's own
servers, addressed by URL) and in `make test-external` against servers started outside recsys."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _admin_execute, free_port
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from recsys.platform import embedded

_ids = itertools.count()


def run_recsys(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """The `recsys` command line in a process of its own, with only the given settings."""
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("RECSYS_", "DATABASE_URL", "CELERY_"))}
    base.update(RECSYS_HOME=str(home), **env)
    return subprocess.run([sys.executable, "-c", "from recsys.cli import main; main()", *args], env=base,
                          capture_output=True, text=True, timeout=120)


def database_url(settings, database: str | None = None, user: str | None = None) -> str:
    url = make_url(embedded.service_env(settings)["DATABASE_URL"])
    if database:
        url = url.set(database=database)
    if user:
        url = url.set(username=user)
    return url.render_as_string(hide_password=False)


def test_services_start_with_external_urls_starts_nothing_and_says_so(db, broker, tmp_path):
    home = tmp_path / "home"
    done = run_recsys(["services", "start"], home, DATABASE_URL=database_url(db),
                      CELERY_BROKER_URL=broker.celery_broker_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("nothing started: DATABASE_URL and CELERY_BROKER_URL")
    assert "external" in done.stdout
    assert not (home / "pgdata").exists() and not (home / "valkey").exists()


@pytest.fixture
def database_without_pgvector(postgres):
    """A database without the vector extension, and a login role that is no superuser (pgvector is not
    a trusted extension, so that role cannot create it)."""
    n = f"{os.getpid()}_{next(_ids)}"
    role, database = f"recsys_plain_{n}", f"recsys_novector_{n}"
    _admin_execute(postgres, f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    _admin_execute(postgres, f'CREATE DATABASE "{database}" OWNER "{role}"')
    yield database_url(postgres, database, role), database
    _admin_execute(postgres, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    _admin_execute(postgres, f'DROP ROLE IF EXISTS "{role}"')


def test_a_database_without_pgvector_is_one_line_exit_1_and_nothing_is_made(postgres, database_without_pgvector,
                                                                             tmp_path):
    url, database = database_without_pgvector
    home = tmp_path / "home"
    for args in (["db", "upgrade"], ["services", "start"]):
        done = run_recsys(args, home, DATABASE_URL=url)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pgvector is not installed in database '{database}'" in lines[0], lines
        assert "CREATE EXTENSION vector" in lines[0]
    # the embedded broker was not started (services start checks before it starts anything) ...
    assert not (home / "valkey").exists()
    # ... and no migration ran
    engine = create_engine(database_url(postgres, database).replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            tables = conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one()
    finally:
        engine.dispose()
    assert tables == 0


def test_an_unreachable_broker_is_one_line_exit_1_and_no_worker_starts(db, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    home = tmp_path / "home"
    for args in (["worker", "--pool", "solo"], ["services", "start"]):
        done = run_recsys(args, home, DATABASE_URL=database_url(db), CELERY_BROKER_URL=dead)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines == [f"recsys: error: broker {dead} (CELERY_BROKER_URL) does not answer"], lines
        assert "celery" not in done.stdout.lower()
    assert not (home / "pgdata").exists()


def test_an_unreachable_database_is_one_line_exit_1(tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/recsys"
    done = run_recsys(["db", "upgrade"], tmp_path / "home", DATABASE_URL=url)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "(DATABASE_URL) unreachable" in lines[0], lines
