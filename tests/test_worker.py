"""Faults that must lose nothing, with a real Celery worker process, the real Valkey broker and Postgres.

Worker processes get short timings (tests/conftest.py WORKER_TEST_ENV): a 3 s job lease and
stale threshold, the `retrieval` ranker as default. A job is made slow where a test needs one
in flight by a long RECSYS_BATCH_WAIT_MS: the worker has claimed the job and waits for more.
Tests wait for states (a job's status, an idle broker), never for a length of time; the
timeouts only guard against a hang.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis
from celery import Celery
from sqlalchemy import text
from support.waiting import wait_until

from recsys import jobs
from recsys.config import Settings
from recsys.platform import embedded
from recsys.platform.broker import DEFAULT_QUEUE, RERANK_QUEUE
from recsys.platform.db import get_engine

pytestmark = pytest.mark.timeout(300)


def payload(**changes) -> dict:
    return {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval", **changes}


def finished(settings: Settings, job_id, timeout: float = 60.0) -> dict:
    job = jobs.wait_for_job(job_id, settings, timeout)
    assert job is not None and job["status"] in jobs.FINISHED_STATUSES, job
    return job


def broker_idle(settings: Settings) -> bool:
    """No message waits in a queue and none is delivered but unacknowledged (acks are late: after the task)."""
    client = redis.Redis.from_url(settings.celery_broker_url)
    return client.llen(RERANK_QUEUE) == 0 and client.llen(DEFAULT_QUEUE) == 0 and client.hlen("unacked") == 0


def cache_rows(settings: Settings, job_id) -> int:
    with get_engine(settings).connect() as conn:
        return conn.execute(text("SELECT count(*) FROM result_cache WHERE job_id = :id"), {"id": job_id}).scalar()


def test_submit_runs_in_the_worker_and_the_next_ask_hits_the_cache(loaded_db, start_worker):
    worker = start_worker(loaded_db)
    outcome = jobs.submit_recommendation(payload(), settings=loaded_db)
    job = finished(loaded_db, outcome.job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert int(job["worker"].rpartition(":")[2]) in worker.pids()
    assert {item["description"] for item in job["result"]["items"]} == {
        "COPPER AND BRASS BAG CHARM", "IVORY GOLD METAL BAG CHARM", "WHITE WITH METAL BAG CHARM"}
    assert job["timings"]["total_ms"] > 0 and job["timings"]["sent_at"]

    hit = jobs.submit_recommendation(payload(), settings=loaded_db)
    assert hit.cached and hit.result["items"] == job["result"]["items"]
    assert jobs.count_jobs(settings=loaded_db) == 1

    status = wait_until(lambda: (s := jobs.worker_status(loaded_db))["workers"][0]["processed"] >= 1 and s, 60,
                        "a heartbeat that counts the job")
    assert status["alive"] and status["last_seen_seconds"] >= 0 and status["workers"][0]["ready"]


def test_a_pure_celery_client_submits_and_reads_results_by_task_name(loaded_db, start_worker):
    start_worker(loaded_db)
    url = loaded_db.celery_broker_url
    client = Celery(broker=url, backend=url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    try:
        first = client.send_task("recsys.submit", args=[payload(), "client-key-1"], queue="celery").get(timeout=60)
        again = client.send_task("recsys.submit", args=[payload(), "client-key-1"], queue="celery").get(timeout=60)
        assert first["created"] and not again["created"] and again["job_id"] == first["job_id"]
        summary = client.AsyncResult(first["job_id"]).get(timeout=60)
        assert summary["status"] == "succeeded" and summary["job_id"] == first["job_id"]
        assert len(summary["result"]["items"]) == 3
        rejected = client.send_task("recsys.submit", args=[{"query": "x", "k": 0}], queue="celery").get(timeout=60)
        assert rejected["status"] == "rejected" and "k must be between" in rejected["error"]
    finally:
        client.close()
    assert jobs.count_jobs(settings=loaded_db) == 1


def test_jobs_answered_inside_another_jobs_batch_still_give_their_celery_result(loaded_db, start_worker):
    """One message's batch ranks all six jobs and takes the other five messages off the queue; every job's
    AsyncResult still holds its own summary. All six are queued before the worker starts, so the first
    message's claim finds the other five whatever the machine's speed, and a process takes its next message
    only after acknowledging this one (late acks, prefetch 1): the five are still waiting."""
    queries = ["BAG CHARM", "LANTERN", "NIGHT LIGHT", "DOORMAT", "TEA SET", "CAKE STAND"]
    outcomes = [jobs.submit_recommendation(payload(query=q), settings=loaded_db) for q in queries]
    worker = start_worker(loaded_db, RECSYS_BATCH_WAIT_MS="0", RECSYS_BATCH_SIZE="8")
    url = loaded_db.celery_broker_url
    client = Celery(broker=url, backend=url)
    client.conf.update(accept_content=["json"], result_serializer="json")
    try:
        summaries = [client.AsyncResult(str(o.job_id)).get(timeout=60) for o in outcomes]
    finally:
        client.close()
    assert [s["job_id"] for s in summaries] == [str(o.job_id) for o in outcomes]
    assert all(s["status"] == "succeeded" and len(s["result"]["items"]) == 3 for s in summaries)
    assert {s["result"]["batch_size"] for s in summaries} == {6}
    rows = [finished(loaded_db, o.job_id) for o in outcomes]
    assert {row["attempts"] for row in rows} == {1}
    # the batch's answers are stored with the result's JSON as the jobs table has it, spliced into Celery's meta
    assert [s["result"] for s in summaries] == [row["result"] for row in rows]
    wait_until(lambda: broker_idle(loaded_db), 60, "no message left in the queue or unacknowledged")
    assert "took 5 waiting messages of answered jobs off the rerank queue" in worker.log_path.read_text(), worker.log()


def test_broker_down_at_submit_then_back_and_the_sweeper_sends_the_job(loaded_db, start_worker, tmp_path):
    from conftest import free_port

    port = free_port()
    settings = loaded_db.with_(broker_port=port)
    outcome = jobs.submit_recommendation(payload(), settings=settings)
    assert outcome.status == "queued" and outcome.created
    assert jobs.get_job(outcome.job_id, settings)["timings"]["sent_at"] is None

    dedicated = Settings(home=tmp_path / "dedicated-broker", broker_port=port)
    embedded.start_broker(dedicated)
    try:
        start_worker(settings, beat=True, RECSYS_JOB_STALE_SECONDS="1")
        job = finished(settings, outcome.job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1 and job["timings"]["sent_at"]
    finally:
        embedded.stop_broker(dedicated)


def test_sigkill_mid_job_redelivers_the_job_and_it_completes_once(loaded_db, start_worker):
    worker = start_worker(loaded_db, RECSYS_BATCH_WAIT_MS="10000")
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    running = wait_until(lambda: (j := jobs.get_job(job_id, loaded_db))["status"] == "running" and j, 60,
                         "the worker to claim the job")
    victim = int(running["worker"].rpartition(":")[2])
    assert victim in worker.pids() and victim != worker.proc.pid
    os.kill(victim, signal.SIGKILL)

    job = finished(loaded_db, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["worker"] != running["worker"]
    wait_until(lambda: broker_idle(loaded_db), 60, "every message, the killed one's included, to be acknowledged")
    assert jobs.get_job(job_id, loaded_db)["timings"]["finished_at"] == job["timings"]["finished_at"]
    assert cache_rows(loaded_db, job_id) == 1
    assert jobs.job_counts(loaded_db)["succeeded"] == 1
    assert worker.proc.poll() is None


@pytest.mark.slow
def test_a_killed_solo_worker_is_recovered_by_the_sweeper_of_another(loaded_db, start_worker):
    first = start_worker(loaded_db, pool="solo", RECSYS_BATCH_WAIT_MS="30000")
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    wait_until(lambda: jobs.get_job(job_id, loaded_db)["status"] == "running", 60, "the worker to claim the job")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)

    start_worker(loaded_db, beat=True)
    job = finished(loaded_db, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert cache_rows(loaded_db, job_id) == 1


def test_a_failing_ranker_is_retried_then_failed_and_does_not_sink_its_batch(loaded_db, start_worker, tmp_path):
    missing = str(tmp_path / "no-such-model")
    start_worker(loaded_db, RECSYS_LLM_MODEL=missing, RECSYS_BATCH_WAIT_MS="300")
    bad = jobs.submit_recommendation(payload(ranker="llm-verbalizer"), settings=loaded_db.with_(llm_model=missing))
    good = jobs.submit_recommendation(payload(customer_id=12583, query="night light"), settings=loaded_db)
    assert finished(loaded_db, good.job_id)["status"] == "succeeded"
    job = finished(loaded_db, bad.job_id)
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"].startswith("failed after 3 attempts: ModelLoadError: cannot find model")


@pytest.mark.slow
def test_the_worker_carries_on_after_the_database_restarts(loaded_db, start_worker):
    worker = start_worker(loaded_db, RECSYS_BATCH_WAIT_MS="10000")
    before = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    assert finished(loaded_db, before)["status"] == "succeeded"

    in_flight = jobs.submit_recommendation(payload(customer_id=12583, query="night light"), settings=loaded_db)
    wait_until(lambda: jobs.get_job(in_flight.job_id, loaded_db)["status"] == "running", 60, "a job in flight")
    embedded._restart_postgres(loaded_db)

    assert finished(loaded_db, in_flight.job_id, timeout=120)["status"] == "succeeded"
    after = jobs.submit_recommendation(payload(customer_id=13047, query="lunch bag"), settings=loaded_db).job_id
    assert finished(loaded_db, after)["status"] == "succeeded"
    assert worker.proc.poll() is None
