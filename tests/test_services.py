"""The embedded services: start, status, env, stop, and one-line failures."""

from __future__ import annotations

import socket

import pytest
import redis
from click.testing import CliRunner
from conftest import EXTERNAL
from sqlalchemy import text

from recsys.cli import cli
from recsys.config import Settings, set_settings
from recsys.platform import embedded
from recsys.platform.db import dispose_engines, get_engine


def test_broker_answers_and_status_reports_it(broker):
    assert redis.Redis.from_url(broker.celery_broker_url).ping()
    status = embedded.broker_status(broker)
    assert status.running and status.where == f"127.0.0.1:{broker.broker_port}"


def test_postgres_status_and_env(postgres):
    status = embedded.postgres_status(postgres)
    assert status.running and status.pid
    env = embedded.service_env(postgres)
    assert env["DATABASE_URL"].startswith("postgresql://postgres@/")
    assert env["CELERY_BROKER_URL"] == f"redis://127.0.0.1:{postgres.broker_port}/0"


def test_start_is_idempotent_across_calls(postgres):
    first = embedded.start_postgres(postgres)
    second = embedded.start_postgres(postgres)
    assert first.pid == second.pid


@pytest.mark.skipif(EXTERNAL, reason="an external server's databases keep the collation their owner chose")
def test_new_cluster_sorts_text_by_code_point_with_the_c_collation(postgres):
    """Databases on a new embedded cluster copy a template1 re-created with LC_COLLATE 'C', whatever the
    environment's locale; the character classes stay the cluster's."""
    words = ["b", "B", "\u00e9", "e", "Z", "10", "9", "a b", "ab"]
    try:
        with get_engine(postgres).connect() as conn:
            collations = conn.execute(text(
                "SELECT d.datname, d.datcollate, d.datctype = t.datctype FROM pg_database d, pg_database t "
                "WHERE d.datname IN (current_database(), 'template1') AND t.datname = 'template0'"
            )).all()
            ordered = conn.execute(text("SELECT array_agg(w ORDER BY w) FROM unnest(CAST(:w AS text[])) AS w"),
                                   {"w": words}).scalar_one()
    finally:
        dispose_engines()  # a pooled session on the template database would stop later tests copying it
    assert sorted(collations) == [(postgres.db_name, "C", True), ("template1", "C", True)]
    assert ordered == sorted(words)  # Python's order, which the rankers' tie-breaks share


def test_taken_port_is_reported_in_one_line(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        settings = Settings(home=tmp_path / "home", broker_port=port)
        with pytest.raises(embedded.ServiceError, match=f"port {port}.*taken"):
            embedded.start_broker(settings)


def test_unwritable_home_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = Settings(home=blocker / "home")
    with pytest.raises(embedded.ServiceError, match="not writable"):
        embedded.start_postgres(settings)


def test_cli_service_failure_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    set_settings(Settings(home=blocker / "home"))
    try:
        result = CliRunner().invoke(cli, ["services", "start"])
    finally:
        set_settings(None)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not writable" in result.output


def test_broker_stop_and_restart(tmp_path):
    from conftest import free_port

    settings = Settings(home=tmp_path / "home", broker_port=free_port())
    embedded.start_broker(settings)
    assert embedded.broker_status(settings).running
    assert embedded.stop_broker(settings)
    assert not embedded.broker_status(settings).running
    assert not embedded.stop_broker(settings)


def test_external_urls_start_nothing_and_unreachable_ones_are_one_line(tmp_path):
    settings = Settings(home=tmp_path / "never", database_url="postgresql://u:secret@127.0.0.1:1/x",
                        broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(embedded.ServiceError) as raised:
        embedded.start_all(settings)
    message = str(raised.value)
    assert "\n" not in message and "(DATABASE_URL) unreachable" in message and "secret" not in message
    statuses = embedded.status_all(settings)
    assert not (tmp_path / "never").exists()
    assert all(not s.embedded and not s.running for s in statuses)
    assert "secret" not in statuses[0].where
    assert embedded.service_env(settings)["CELERY_BROKER_URL"] == "redis://127.0.0.1:1/0"
