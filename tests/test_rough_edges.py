"""What a new user hit in the first hour: the CLI and the API agree, bad requests are refused up front,
`recsys up` cleans up after itself, the embedded services stay embedded after `export $(recsys services env)`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXTERNAL, free_port
from support.waiting import wait_until

from recsys import jobs
from recsys.cli import cli
from recsys.config import set_settings
from recsys.platform import embedded


def job_rows(settings) -> int:
    return jobs.count_jobs(settings)


def test_unknown_customer_without_query_is_refused_at_submit(client, loaded_db, auth_headers, runner):
    refused = client.post("/api/v1/recommendations", headers=auth_headers, json={"customer_id": 99999999, "k": 3})
    assert refused.status_code == 400
    assert "has no purchases and the request has no query text" in refused.get_json()["error"]["message"]
    cli_refused = runner.invoke(cli, ["submit", "--customer", "99999999", "-k", "3"])
    assert cli_refused.exit_code == 2 and "no query text" in cli_refused.output
    assert job_rows(loaded_db) == 0
    cold = client.post("/api/v1/recommendations", headers=auth_headers,
                       json={"customer_id": 99999999, "query": "lantern", "k": 3})
    assert cold.status_code == 202 and job_rows(loaded_db) == 1  # with a query it is a cold start


def test_history_of_an_unknown_customer_is_bad_input_in_the_cli_as_in_the_api(client, loaded_db, auth_headers,
                                                                               runner):
    assert client.get("/api/v1/customers/99999999/history", headers=auth_headers).status_code == 404
    unknown = runner.invoke(cli, ["history", "99999999"])
    assert unknown.exit_code == 2 and "no customer 99999999" in unknown.output
    known = runner.invoke(cli, ["history", "15781", "-n", "2"])
    assert known.exit_code == 0 and len(known.output.strip().splitlines()) == 2


@pytest.mark.skipif(EXTERNAL, reason="the session's services are external in this mode")
def test_the_urls_services_env_prints_still_name_the_embedded_services(db, runner):
    exported = embedded.service_env(db)
    settings = db.with_(database_url=exported["DATABASE_URL"], broker_url=exported["CELERY_BROKER_URL"])
    assert settings.uses_embedded_db and settings.uses_embedded_broker
    assert not db.with_(database_url=exported["DATABASE_URL"].replace(db.db_name, "elsewhere")).uses_embedded_db
    assert not db.with_(broker_url=f"redis://127.0.0.1:{db.broker_port + 1}/0").uses_embedded_broker
    set_settings(settings)
    status = runner.invoke(cli, ["services", "status"])
    assert status.exit_code == 0, status.output
    lines = status.output.strip().splitlines()
    assert len(lines) == 2 and all(" running " in line and " embedded " in line for line in lines), lines


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _up_env(home: Path, broker_port: int, web_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "CELERY_BROKER_URL") and not key.startswith("RECSYS_")}
    env.update(RECSYS_HOME=str(home), RECSYS_BROKER_PORT=str(broker_port), RECSYS_WEB_PORT=str(web_port),
               RECSYS_RANKER="retrieval", RECSYS_LOG_LEVEL="WARNING")
    return env


@pytest.mark.slow
@pytest.mark.skipif(EXTERNAL, reason="up starts embedded services")
def test_up_stops_what_it_started_or_found_running_from_its_home(tmp_path, sample_csv):
    from recsys.config import Settings

    home = tmp_path / "home"
    broker_port, web_port = free_port(), free_port()
    settings = Settings(home=home, broker_port=broker_port, web_port=web_port)
    recsys = [str(Path(sys.executable).parent / "recsys")]

    # The broker's port is taken: up fails after starting Postgres, and must not leave it running.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker_port))
        squatter.listen()
        failed = subprocess.run([*recsys, "up", "--data", str(sample_csv)], env=_up_env(home, broker_port, web_port),
                                capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and f"port {broker_port}" in failed.stderr
    assert "stopped postgres" in failed.stdout and not embedded.postgres_status(settings).running

    # Postgres left running from this home (as an older up did) is up's own: Ctrl-C stops it with the rest.
    embedded.start_postgres(settings)
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*recsys, "up", "--data", str(sample_csv)], env=_up_env(home, broker_port, web_port),
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "press Ctrl-C" in log_path.read_text() or proc.poll() is not None, 900,
                   "recsys up to print its URLs")
        output = log_path.read_text()
        assert proc.poll() is None and "web: http://" in output, output[-3000:]
        import requests

        health = requests.get(f"http://127.0.0.1:{web_port}/api/v1/health", timeout=10).json()
        assert health["status"] in ("ok", "degraded")  # answering and warm when the URLs are printed
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        rest = log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for stop in (embedded.stop_broker, embedded.stop_postgres):  # tidy up without hiding the failure
            with contextlib.suppress(Exception):
                stop(settings)
    assert proc.returncode == 0, rest
    assert "stopped broker, postgres" in rest
    assert not embedded.postgres_status(settings).running and not embedded.broker_status(settings).running
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if str(home) in _cmdline(p)]
    assert leftovers == []  # no worker pool process or web process outlives up



def test_health_says_warming_until_the_web_process_is_warm(client, db, monkeypatch):
    """gunicorn starts the warm-up in each process; here the test starts it, holding the query cache's lock
    so the warm-up cannot finish before the test has looked."""
    import threading

    from recsys.catalog import embedding
    from web import health

    monkeypatch.setattr(health, "_warm_up_started", threading.Event())
    monkeypatch.setattr(health, "_warm_up_done", threading.Event())
    assert client.get("/api/v1/health").get_json()["status"] in ("ok", "degraded")  # never started: not warming
    with embedding._query_lock:
        health.start_warm_up(db)
        warming = client.get("/api/v1/health")
        assert warming.status_code == 503 and warming.get_json()["status"] == "warming"
    assert health._warm_up_done.wait(120)
    warm = client.get("/api/v1/health")
    assert warm.status_code == 200 and warm.get_json()["status"] in ("ok", "degraded")


def test_the_worker_logs_one_line_per_job(loaded_db, start_worker):
    worker = start_worker(loaded_db, pool="solo")
    outcome = jobs.submit_recommendation({"customer_id": 15781, "query": "BAG CHARM", "k": 3, "explain": True,
                                          "ranker": "retrieval"}, loaded_db)
    assert jobs.wait_for_job(outcome.job_id, loaded_db, timeout=120)["status"] == "succeeded"
    worker.stop()
    lines = [line for line in worker.log().splitlines() if str(outcome.job_id) in line]
    assert len(lines) == 1 and "succeeded: retrieval, 3 items" in lines[0], lines
    assert "COPPER AND BRASS BAG CHARM" not in worker.log()  # no result dictionaries in the terminal


def test_an_ingest_that_adds_nothing_changes_nothing(loaded_db, sample_csv, tmp_path, runner):
    from sqlalchemy import text

    from recsys.catalog.ingest import ingest_file
    from recsys.platform.db import get_engine
    from recsys.recommend.cache import fingerprints

    engine = get_engine(loaded_db)
    with engine.connect() as conn:
        version = fingerprints(conn, 15781)
    header, *rows = sample_csv.read_text().splitlines()
    shuffled = tmp_path / "same-rows.csv"  # the same purchases, other bytes
    shuffled.write_text("\n".join([header, *reversed(rows)]) + "\n")
    report = ingest_file(shuffled, loaded_db)
    assert report.rows_new == 0 and report.copurchase_mode == "unchanged"
    with engine.connect() as conn:
        assert fingerprints(conn, 15781) == version
        assert conn.execute(text("SELECT status FROM ingest_runs ORDER BY id DESC LIMIT 1")).scalar_one() == "unchanged"

    rejected = tmp_path / "all-bad.csv"
    rejected.write_text(header + "\n536400,71053,WHITE METAL LANTERN,six,2010-12-01 08:26:00,3.39,17850,UK\n"
                        "536401,22224,WHITE LOVEBIRD LANTERN,2,yesterday,2.95,17850,UK\n")
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT count(*) FROM ingest_runs")).scalar_one()
    done = runner.invoke(cli, ["ingest", str(rejected)])
    assert done.exit_code == 2 and "all 2 rows left after cleaning were rejected" in done.output
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ingest_runs")).scalar_one() == runs
        assert fingerprints(conn, 15781) == version
