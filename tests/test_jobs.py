"""Durable jobs against the real Postgres and Valkey: submitting, claiming, batching, retrying, sweeping.

These call the worker-side functions (`jobs.run_job`) in this process; tests/test_worker.py runs
the same path through a real Celery worker process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from click.testing import CliRunner
from conftest import free_port
from sqlalchemy import text
from support.waiting import wait_until

from recsys import jobs
from recsys.cli import cli
from recsys.cli.jobs import parse_duration
from recsys.platform.db import get_engine
from recsys.recommend.request import RequestError

WORKER = "test-host:1"


def payload(**changes) -> dict:
    return {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval", **changes}


OTHER_REQUESTS = [
    payload(customer_id=12583, query="night light"),
    payload(customer_id=13047, query="lunch bag"),
    payload(customer_id=17850, query="lantern"),
    payload(customer_id=14000, query="picture frame"),
]


def rerank_messages(settings) -> list[dict]:
    raw = redis.Redis.from_url(settings.celery_broker_url).lrange("rerank", 0, -1)
    return [json.loads(message) for message in raw]


def scalar(settings, sql: str, **params):
    with get_engine(settings).begin() as conn:
        return conn.execute(text(sql), params).scalar()


def test_bad_input_is_rejected_and_writes_nothing(loaded_db, flushed_broker):
    bad = [{"query": "x", "k": 0}, {"customer_id": "15781"}, {}, {"query": "x", "ranker": "nope"},
           {"query": "x", "colour": "red"}, {"query": "x", "exclude_purchased": True}, ["not", "a", "dict"]]
    for item in bad:
        with pytest.raises(RequestError):
            jobs.submit_recommendation(item, settings=loaded_db)
    for key in ("", "x" * 201, 7):
        with pytest.raises(RequestError):
            jobs.submit_recommendation(payload(), idempotency_key=key, settings=loaded_db)
    assert jobs.count_jobs(settings=loaded_db) == 0
    assert rerank_messages(loaded_db) == []


def test_submit_commits_the_job_then_sends_its_message(loaded_db, flushed_broker):
    outcome = jobs.submit_recommendation(payload(), settings=loaded_db)
    assert (outcome.status, outcome.created, outcome.cached, outcome.result) == ("queued", True, False, None)
    job = jobs.get_job(outcome.job_id, loaded_db)
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["request"] == {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval",
                              "explain": False, "exclude_purchased": False}
    assert job["timings"]["sent_at"] is not None and job["cache_key"]
    [message] = rerank_messages(loaded_db)
    assert message["headers"]["task"] == "recsys.rerank"
    assert message["headers"]["id"] == str(outcome.job_id)


def test_default_ranker_is_filled_in_from_settings(loaded_db, flushed_broker):
    request = payload()
    del request["ranker"]
    outcome = jobs.submit_recommendation(request, settings=loaded_db.with_(ranker="popularity"))
    assert jobs.get_job(outcome.job_id, loaded_db)["request"]["ranker"] == "popularity"


def test_same_idempotency_key_returns_the_same_job(loaded_db, flushed_broker):
    first = jobs.submit_recommendation(payload(), idempotency_key="order-1", settings=loaded_db)
    second = jobs.submit_recommendation(payload(), idempotency_key="order-1", settings=loaded_db)
    assert second.job_id == first.job_id and first.created and not second.created
    with pytest.raises(RequestError, match="different request"):
        jobs.submit_recommendation(payload(k=4), idempotency_key="order-1", settings=loaded_db)
    assert jobs.count_jobs(settings=loaded_db) == 1
    assert len(rerank_messages(loaded_db)) == 1


def test_concurrent_submits_with_one_key_make_one_job(loaded_db, flushed_broker):
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(
            lambda _: jobs.submit_recommendation(payload(), idempotency_key="race", settings=loaded_db), range(8)
        ))
    assert len({o.job_id for o in outcomes}) == 1
    assert sum(o.created for o in outcomes) == 1
    assert jobs.count_jobs(settings=loaded_db) == 1


def test_one_message_ranks_a_batch_and_the_other_messages_do_nothing(loaded_db, flushed_broker):
    settings = loaded_db.with_(batch_size=8, batch_wait_ms=0)
    ids = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), *OTHER_REQUESTS]]
    outcome = jobs.run_job(ids[0], worker=WORKER, settings=settings)
    assert outcome.ran and outcome.status == "succeeded"
    assert {o["job_id"] for o in outcome.others} == {str(i) for i in ids[1:]}
    for job_id in ids:
        job = jobs.get_job(job_id, settings)
        assert job["status"] == "succeeded" and job["attempts"] == 1 and job["worker"] == WORKER
        assert job["result"]["batch_size"] == 5 and len(job["result"]["items"]) == 3
    later = jobs.run_job(ids[3], worker="test-host:2", settings=settings)
    assert not later.ran and later.status == "succeeded"
    assert later.result == jobs.get_job(ids[3], settings)["result"]
    assert jobs.get_job(ids[3], settings)["attempts"] == 1
    assert jobs.cache_stats(settings)["entries"] == 5


@pytest.mark.timeout(180)
def test_discover_batches_stay_at_32_jobs_whatever_the_batch_size_says():
    """Generation takes seconds a request on a CPU: 64 discover jobs would run past the job time limit."""
    from recsys.config import Settings
    from recsys.jobs.kinds import DISCOVER, RECOMMENDATION, job_kind

    assert job_kind(RECOMMENDATION).batch_size(Settings()) == 64 == Settings().batch_size
    assert job_kind(DISCOVER).batch_size(Settings()) == 32
    assert job_kind(DISCOVER).batch_size(Settings(batch_size=8)) == 8
    assert job_kind(RECOMMENDATION).batch_size(Settings(batch_size=128)) == 128


def test_batch_waits_for_jobs_that_arrive(loaded_db, flushed_broker):
    """Jobs submitted while the runner waits join its batch, and a full batch goes at once: with a
    ten-minute batch_wait_ms, the run finishing at all (well inside the test's timeout) shows it."""
    settings = loaded_db.with_(batch_size=3, batch_wait_ms=600_000)
    first = jobs.submit_recommendation(payload(), settings=settings).job_id
    outcomes = []
    runner = threading.Thread(
        target=lambda: outcomes.append(jobs.run_job(first, worker=WORKER, settings=settings)), daemon=True
    )
    runner.start()
    wait_until(lambda: jobs.get_job(first, settings)["status"] == "running", 60, "the runner to claim the first job")
    late = [jobs.submit_recommendation(p, settings=settings).job_id for p in OTHER_REQUESTS[:2]]
    runner.join()
    [outcome] = outcomes
    assert outcome.status == "succeeded" and {o["job_id"] for o in outcome.others} == {str(i) for i in late}


def test_cache_hit_answers_at_once_and_counts(loaded_db, flushed_broker):
    outcome = jobs.submit_recommendation(payload(), settings=loaded_db)
    jobs.run_job(outcome.job_id, worker=WORKER, settings=loaded_db)
    stored = jobs.get_job(outcome.job_id, loaded_db)["result"]
    hit = jobs.submit_recommendation(payload(), settings=loaded_db)
    assert hit.cached and hit.job_id == outcome.job_id and hit.status == "succeeded" and not hit.created
    assert hit.result["items"] == stored["items"]
    assert jobs.count_jobs(settings=loaded_db) == 1 and len(rerank_messages(loaded_db)) == 1
    assert jobs.cache_stats(loaded_db)["hits"] == 1
    assert not jobs.submit_recommendation(payload(k=4), settings=loaded_db).cached
    assert not jobs.submit_recommendation(payload(explain=True), settings=loaded_db).cached


def test_a_new_purchase_changes_the_cache_key(loaded_db, flushed_broker):
    outcome = jobs.submit_recommendation(payload(), settings=loaded_db)
    jobs.run_job(outcome.job_id, worker=WORKER, settings=loaded_db)
    with get_engine(loaded_db).begin() as conn:
        conn.execute(text(
            "INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity, "
            "unit_price, invoiced_at, country) VALUES ('\\x01', '999999', '90001B', 15781, "
            "'COPPER AND BRASS BAG CHARM', 1, 2.10, '2011-01-01', 'United Kingdom')"
        ))
    again = jobs.submit_recommendation(payload(), settings=loaded_db)
    assert not again.cached and again.created


def test_a_changed_catalog_changes_the_cache_key_and_a_purchase_elsewhere_does_not(loaded_db):
    """The catalog part of the key is one counter kept by a trigger on products (migration 0010)."""
    from recsys.recommend.cache import cache_key
    from recsys.recommend.request import RecommendationRequest

    request = RecommendationRequest(**payload()).with_defaults(loaded_db)
    engine = get_engine(loaded_db)

    def key() -> str:
        with engine.connect() as conn:
            return cache_key(conn, request, loaded_db)

    def run(statement: str) -> None:
        with engine.begin() as conn:
            conn.execute(text(statement))

    keys = [key()]
    run("UPDATE products SET embedding = embedding, embedded_at = now() WHERE stock_code = '23084'")  # re-embedded
    keys.append(key())
    run("INSERT INTO products (stock_code, description) VALUES ('NEW1', 'A NEW PRODUCT')")
    keys.append(key())
    run("UPDATE products SET is_non_product = true WHERE stock_code = 'NEW1'")
    keys.append(key())
    run("DELETE FROM products WHERE stock_code = 'NEW1'")
    keys.append(key())
    assert len(set(keys)) == len(keys)
    run("INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity, unit_price, "
        "invoiced_at, country) VALUES ('\\x02', '999998', '84879', 12583, 'ASSORTED COLOUR BIRD ORNAMENT', 1, "
        "1.69, '2011-01-01', 'France')")  # another customer's purchase: neither this customer nor the catalog
    assert key() == keys[-1]


def test_a_job_read_survives_its_pooled_connection_being_killed(loaded_db, flushed_broker):
    """Job reads skip the check-out ping (one round trip instead of two): a connection found dead
    is replaced and the read retried, so a database restart costs a reader nothing."""
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    assert jobs.get_job(job_id, loaded_db)["status"] == "queued"  # the read pool now holds a connection
    with get_engine(loaded_db).connect() as conn:
        killed = conn.execute(text(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )).scalar_one()
    assert killed >= 1
    assert jobs.get_job(job_id, loaded_db)["status"] == "queued"


def test_concurrent_messages_run_a_job_once(loaded_db, flushed_broker):
    settings = loaded_db.with_(batch_size=1)
    job_id = jobs.submit_recommendation(payload(), settings=settings).job_id
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: jobs.run_job(job_id, worker=f"test-host:{i}", settings=settings),
                                 range(4)))
    assert sum(o.ran for o in outcomes) == 1
    for outcome in outcomes:
        assert outcome.ran or outcome.status == "succeeded" or outcome.retry_in is not None
    assert jobs.get_job(job_id, settings)["attempts"] == 1


def _pretend_running(settings, job_id, worker: str, lease_seconds: float, attempts: int = 1) -> None:
    with get_engine(settings).begin() as conn:
        conn.execute(
            text("UPDATE jobs SET status = 'running', attempts = :a, worker = :w, started_at = now(), "
                 "lease_expires_at = now() + make_interval(secs => :s) WHERE id = :id"),
            {"a": attempts, "w": worker, "s": lease_seconds, "id": job_id},
        )


def test_a_running_job_with_an_expired_lease_is_taken_over(loaded_db, flushed_broker):
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    _pretend_running(loaded_db, job_id, "elsewhere:42", lease_seconds=-1)
    outcome = jobs.run_job(job_id, worker=WORKER, settings=loaded_db)
    assert outcome.ran and outcome.status == "succeeded"
    job = jobs.get_job(job_id, loaded_db)
    assert job["attempts"] == 2 and job["worker"] == WORKER


def test_a_live_owner_keeps_its_job_and_a_dead_local_one_loses_it_at_once(loaded_db, flushed_broker):
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    live_parent = f"{socket.gethostname()}:{os.getppid()}"
    _pretend_running(loaded_db, job_id, live_parent, lease_seconds=60)
    busy = jobs.run_job(job_id, worker=WORKER, settings=loaded_db)
    assert not busy.ran and busy.status == "running" and 0.5 <= busy.retry_in <= 5.0

    dead = subprocess.Popen(["true"])
    dead.wait()
    _pretend_running(loaded_db, job_id, f"{socket.gethostname()}:{dead.pid}", lease_seconds=60)
    outcome = jobs.run_job(job_id, worker=WORKER, settings=loaded_db)
    assert outcome.ran and outcome.status == "succeeded"


def test_a_message_whose_job_another_worker_holds_ranks_the_queued_jobs_meanwhile(loaded_db, flushed_broker):
    """With several worker processes most messages find their job in another process's batch: the message
    still asks to be retried, and its process ranks a batch of the queued jobs instead of idling."""
    held = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    queued = [jobs.submit_recommendation(p, settings=loaded_db).job_id for p in OTHER_REQUESTS]
    _pretend_running(loaded_db, held, f"{socket.gethostname()}:{os.getppid()}", lease_seconds=60)

    busy = jobs.run_job(held, worker=WORKER, settings=loaded_db)

    assert not busy.ran and busy.status == "running" and 0.5 <= busy.retry_in <= 5.0
    assert sorted(o["job_id"] for o in busy.others) == sorted(str(j) for j in queued)
    assert all(o["status"] == "succeeded" and o["result"]["items"] for o in busy.others)
    for job_id in queued:
        job = jobs.get_job(job_id, loaded_db)
        assert job["status"] == "succeeded" and job["worker"] == WORKER and job["attempts"] == 1
    assert jobs.get_job(held, loaded_db)["status"] == "running"
    assert jobs.run_job(held, worker=WORKER, settings=loaded_db).others == []  # nothing queued: nothing done


def test_a_message_whose_job_was_finished_elsewhere_while_its_process_ranked_a_batch_is_done(
        loaded_db, flushed_broker, monkeypatch):
    """No retry (a new message to send, receive and acknowledge) when the other worker finished the job meanwhile."""
    from recsys.jobs import runner

    held = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    queued = [jobs.submit_recommendation(p, settings=loaded_db).job_id for p in OTHER_REQUESTS]
    holder = f"{socket.gethostname()}:{os.getppid()}"
    _pretend_running(loaded_db, held, holder, lease_seconds=60)
    answer = {"items": [{"rank": 1, "stock_code": "22728"}], "ranker": "elsewhere"}
    ranking_a_batch = runner._run_queued

    def the_holder_finishes_meanwhile(*args, **kwargs):
        others = ranking_a_batch(*args, **kwargs)
        with get_engine(loaded_db).begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'succeeded', result = CAST(:r AS jsonb), finished_at = now() "
                              "WHERE id = :id AND worker = :w"), {"r": json.dumps(answer), "id": held, "w": holder})
        return others

    monkeypatch.setattr(runner, "_run_queued", the_holder_finishes_meanwhile)
    outcome = jobs.run_job(held, worker=WORKER, settings=loaded_db)

    assert not outcome.ran and outcome.retry_in is None
    assert outcome.status == "succeeded" and outcome.result == answer
    assert sorted(o["job_id"] for o in outcome.others) == sorted(str(j) for j in queued)
    assert jobs.get_job(held, loaded_db)["worker"] == holder


def _cached_queries(settings) -> set[str]:
    from recsys.catalog import embedding

    return {query for model, _, query in embedding._query_vectors if model == settings.embedding_model}


@pytest.fixture
def empty_query_cache():
    from recsys.catalog import embedding

    with embedding._query_lock:
        embedding._query_vectors.clear()


def _after_warming(outcome):
    """The warm-up thread holds runner._warming from before it starts until it is done: wait for it."""
    from recsys.jobs import runner

    with runner._warming:
        return outcome


def test_a_lone_worker_warms_the_next_batch_queries_after_its_batch(loaded_db, flushed_broker,
                                                                   empty_query_cache):
    settings = loaded_db.with_(batch_size=2)
    first = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), OTHER_REQUESTS[0]]]
    upcoming = [jobs.submit_recommendation(p, settings=settings) for p in OTHER_REQUESTS[1:3]]

    outcome = _after_warming(jobs.run_job(first[0], worker=WORKER, settings=settings))

    assert outcome.ran and [o["job_id"] for o in outcome.others] == [str(first[1])]
    assert {"lunch bag", "lantern"} <= _cached_queries(settings)
    assert all(jobs.get_job(u.job_id, settings)["status"] == "queued" for u in upcoming)  # warmed, not claimed


def test_a_lone_worker_prepares_the_next_batch_while_it_records_its_own(loaded_db, flushed_broker, monkeypatch):
    from recsys.recommend import pipeline

    settings = loaded_db.with_(batch_size=2)
    first = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), OTHER_REQUESTS[0]]]
    upcoming = [jobs.submit_recommendation(p, settings=settings).job_id for p in OTHER_REQUESTS[1:3]]
    _after_warming(jobs.run_job(first[0], worker=WORKER, settings=settings))
    prepared_in_batch = []
    prepare = pipeline._prepare
    monkeypatch.setattr(pipeline, "_prepare", lambda *args: prepared_in_batch.append(args) or prepare(*args))

    outcome = jobs.run_job(upcoming[0], worker=WORKER, settings=settings)

    assert outcome.ran and outcome.status == "succeeded" and [o["job_id"] for o in outcome.others] == [str(upcoming[1])]
    assert prepared_in_batch == []


def test_no_warming_while_another_worker_ranks(loaded_db, flushed_broker, empty_query_cache):
    """Another worker would as likely claim the next batch: encoding it here could be wasted."""
    settings = loaded_db.with_(batch_size=2)
    elsewhere = jobs.submit_recommendation(payload(query="clock"), settings=settings).job_id
    _pretend_running(settings, elsewhere, "elsewhere:42", lease_seconds=60)
    first = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), OTHER_REQUESTS[0]]]
    jobs.submit_recommendation(payload(customer_id=12583, query="doormat"), settings=settings)

    outcome = _after_warming(jobs.run_job(first[0], worker=WORKER, settings=settings))

    assert outcome.ran and len(outcome.others) == 1
    assert "doormat" not in _cached_queries(settings)


def test_no_warming_while_another_worker_finished_jobs_moments_ago(loaded_db, flushed_broker, empty_query_cache):
    settings = loaded_db.with_(batch_size=2)
    elsewhere = jobs.submit_recommendation(payload(query="clock"), settings=settings).job_id
    with get_engine(settings).begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'succeeded', worker = 'elsewhere:42', finished_at = now() "
                          "WHERE id = :id"), {"id": elsewhere})
    first = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), OTHER_REQUESTS[0]]]
    jobs.submit_recommendation(payload(customer_id=12583, query="doormat"), settings=settings)

    outcome = _after_warming(jobs.run_job(first[0], worker=WORKER, settings=settings))

    assert outcome.ran and len(outcome.others) == 1
    assert "doormat" not in _cached_queries(settings)


def test_choosing_what_to_warm_reads_indexes_not_every_finished_job_kept(loaded_db):
    """The warm-up's statement runs after every full batch; a jobs table keeps every finished job until
    `recsys jobs cleanup`, so a plan that reads the whole table grows with the history."""
    from recsys.jobs import runner

    with get_engine(loaded_db).begin() as conn:
        conn.execute(text(
            """
            INSERT INTO jobs (id, kind, status, request, worker, created_at, finished_at)
            SELECT gen_random_uuid(), 'recommendation', 'succeeded', '{}', 'elsewhere:' || (g % 4),
                   now() - interval '30 days' + make_interval(secs => g),
                   now() - interval '30 days' + make_interval(secs => g + 1)
            FROM generate_series(1, 100000) g
            """
        ))
        conn.execute(text(  # a busy lone worker: its own jobs of the last seconds
            """
            INSERT INTO jobs (id, kind, status, request, worker, created_at, finished_at)
            SELECT gen_random_uuid(), 'recommendation', 'succeeded', '{}', :me, now() - interval '20 seconds',
                   now() - make_interval(secs => g % 8)
            FROM generate_series(1, 3000) g
            """
        ), {"me": WORKER})
        conn.execute(text("ANALYZE jobs"))
        plan = "\n".join(conn.execute(
            text("EXPLAIN " + runner._UPCOMING.text), {"kind": "recommendation", "n": 32, "me": WORKER}
        ).scalars())
    assert "Seq Scan on jobs" not in plan, plan


def test_jobs_whose_worker_was_lost_on_every_attempt_fail(loaded_db, flushed_broker):
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    _pretend_running(loaded_db, job_id, "elsewhere:42", lease_seconds=-1, attempts=loaded_db.job_max_attempts)
    jobs.requeue_stale(loaded_db)
    job = jobs.get_job(job_id, loaded_db)
    assert job["status"] == "failed" and "worker running it was lost" in job["error"]


def test_a_failing_ranker_is_retried_then_fails_with_a_readable_error(loaded_db, flushed_broker, tmp_path):
    settings = loaded_db.with_(llm_model=str(tmp_path / "no-such-model"), job_max_attempts=2, batch_size=1)
    job_id = jobs.submit_recommendation(payload(ranker="llm-verbalizer"), settings=settings).job_id
    first = jobs.run_job(job_id, worker=WORKER, settings=settings)
    assert first.status == "queued" and first.retry_in == 1.0 and "cannot find model" in first.error
    job = jobs.get_job(job_id, settings)
    assert job["status"] == "queued" and job["attempts"] == 1 and "cannot find model" in job["error"]
    second = jobs.run_job(job_id, worker=WORKER, settings=settings)
    assert second.status == "failed" and second.retry_in is None
    job = jobs.get_job(job_id, settings)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"].startswith("failed after 2 attempts: ModelLoadError: cannot find model")


def test_one_failing_job_does_not_fail_its_batch(loaded_db, flushed_broker, tmp_path):
    settings = loaded_db.with_(llm_model=str(tmp_path / "no-such-model"), batch_wait_ms=0)
    bad = jobs.submit_recommendation(payload(ranker="llm-verbalizer"), settings=settings).job_id
    good = [jobs.submit_recommendation(p, settings=settings).job_id for p in OTHER_REQUESTS[:2]]
    outcome = jobs.run_job(bad, worker=WORKER, settings=settings)
    assert outcome.status == "queued" and outcome.retry_in is not None
    for job_id in good:
        job = jobs.get_job(job_id, settings)
        assert job["status"] == "succeeded" and job["result"]["batch_size"] == 1


def test_a_request_that_cannot_be_served_fails_without_retries(loaded_db, flushed_broker):
    """Servable at submit, not when it runs (the customer's purchases were deleted in between): no retry."""
    outcome = jobs.submit_recommendation({"customer_id": 13047, "k": 3, "ranker": "retrieval"}, settings=loaded_db)
    with get_engine(loaded_db).begin() as conn:
        conn.execute(text("DELETE FROM purchases WHERE customer_id = 13047"))
    result = jobs.run_job(outcome.job_id, worker=WORKER, settings=loaded_db)
    assert result.status == "failed" and "has no purchases" in result.error
    assert jobs.get_job(outcome.job_id, loaded_db)["attempts"] == 1


@pytest.mark.timeout(120)
def test_broker_down_at_submit_keeps_the_job_for_the_sweeper(loaded_db, flushed_broker, caplog):
    """Submitting gives up on a dead broker (the test's timeout guards against a hang) and keeps the job."""
    down = loaded_db.with_(broker_port=free_port())
    outcome = jobs.submit_recommendation(payload(), settings=down)
    assert outcome.status == "queued" and outcome.created
    assert jobs.get_job(outcome.job_id, loaded_db)["timings"]["sent_at"] is None
    assert "stays queued" in caplog.text
    assert jobs.requeue_stale(loaded_db) == 0, "not stale yet"
    assert jobs.requeue_stale(loaded_db, older_than_seconds=0) == 1
    assert [m["headers"]["id"] for m in rerank_messages(loaded_db)] == [str(outcome.job_id)]
    assert jobs.get_job(outcome.job_id, loaded_db)["timings"]["sent_at"] is not None
    assert jobs.requeue_stale(down, older_than_seconds=0) == 0


def test_cancel_only_queued_jobs(loaded_db, flushed_broker):
    job_id = jobs.submit_recommendation(payload(), settings=loaded_db).job_id
    assert jobs.cancel_job(job_id, loaded_db)
    assert not jobs.cancel_job(job_id, loaded_db)
    assert not jobs.cancel_job("not-an-id", loaded_db) and not jobs.cancel_job(uuid.uuid4(), loaded_db)
    outcome = jobs.run_job(job_id, worker=WORKER, settings=loaded_db)
    assert not outcome.ran and outcome.status == "cancelled"


def test_listing_counting_throughput_and_cleanup(loaded_db, flushed_broker):
    settings = loaded_db.with_(batch_wait_ms=0)
    ids = [jobs.submit_recommendation(p, settings=settings).job_id for p in [payload(), *OTHER_REQUESTS]]
    jobs.cancel_job(ids[-1], settings)
    jobs.run_job(ids[0], worker=WORKER, settings=settings)
    listed = jobs.list_jobs(limit=2, settings=settings)
    assert [j["id"] for j in listed] == [str(ids[-1]), str(ids[-2])] and "result" not in listed[0]
    assert len(jobs.list_jobs(status="succeeded", settings=settings)) == 4
    assert jobs.list_jobs(limit=2, offset=4, settings=settings)[0]["id"] == str(ids[0])
    assert jobs.count_jobs(settings=settings) == 5 and jobs.count_jobs(settings, "cancelled") == 1
    assert jobs.job_counts(settings) == {"queued": 0, "running": 0, "succeeded": 4, "failed": 0, "cancelled": 1}
    throughput = jobs.job_throughput(settings, window_seconds=600)
    assert throughput["finished"] == 4 and throughput["p95_ms"] >= throughput["p50_ms"] > 0
    assert jobs.get_job(ids[0], settings)["timings"]["total_ms"] > 0
    for bad in ({"status": "done"}, {"limit": 0}, {"offset": -1}):
        with pytest.raises(RequestError):
            jobs.list_jobs(settings=settings, **bad)
    assert jobs.cleanup_jobs(3600, settings) == 0
    assert jobs.cleanup_jobs(0, settings) == 5
    assert jobs.get_job(ids[0], settings) is None and jobs.get_job("nope", settings) is None


def test_worker_status_reads_heartbeats(loaded_db, flushed_broker):
    assert jobs.worker_status(loaded_db) == {"workers": [], "alive": False, "last_seen_seconds": None}
    before = time.time()
    jobs.record_heartbeat(WORKER, loaded_db, ready=True)
    status = jobs.worker_status(loaded_db)
    since_before = time.time() - before
    assert status["alive"] and status["workers"][0]["worker"] == WORKER
    assert 0 <= status["last_seen_seconds"] <= round(since_before, 3) + 0.001, "seen between the two clock reads"
    ttl = redis.Redis.from_url(loaded_db.celery_broker_url).ttl(jobs.HEARTBEAT_PREFIX + WORKER)
    assert 0 < ttl <= 30
    jobs.clear_heartbeat(WORKER, loaded_db)
    assert not jobs.worker_status(loaded_db)["alive"]
    down = jobs.worker_status(loaded_db.with_(broker_port=free_port()))
    assert not down["alive"] and "broker unreachable" in down["error"]


def test_parse_duration():
    assert [parse_duration(v) for v in ("90", "45s", "30m", "12h", "7d", "1w")] == [
        90, 45, 1800, 43200, 604800, 604800]
    for bad in ("", "soon", "-1d", "7 days"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cli_submit_and_jobs(loaded_db, flushed_broker):
    runner = CliRunner()
    result = runner.invoke(cli, ["submit", "--customer", "15781", "--query", "BAG CHARM", "-k", "3",
                                 "--ranker", "retrieval", "--idempotency-key", "cli-1", "--json"])
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.output)["job_id"]
    again = runner.invoke(cli, ["submit", "--customer", "15781", "--query", "BAG CHARM", "-k", "3",
                                "--ranker", "retrieval", "--idempotency-key", "cli-1", "--json"])
    assert json.loads(again.output)["job_id"] == job_id and not json.loads(again.output)["created"]
    shown = runner.invoke(cli, ["jobs", "show", job_id, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["status"] == "queued"
    listed = runner.invoke(cli, ["jobs", "list", "--json"])
    assert [j["id"] for j in json.loads(listed.output)] == [job_id]
    assert runner.invoke(cli, ["jobs", "cancel", job_id]).exit_code == 0
    for args, message in [
        (["jobs", "cancel", job_id], "only queued jobs"),
        (["submit", "--query", "x", "-k", "0"], "k must be between"),
        (["submit", "-k", "3"], "needs a query"),
        (["jobs", "show", "nope"], "not a job id"),
        (["jobs", "show", str(uuid.uuid4())], "no job"),
        (["jobs", "cleanup", "--older-than", "soon"], "cannot read duration"),
    ]:
        failed = runner.invoke(cli, args)
        assert failed.exit_code == 2, (args, failed.output)
        assert message in failed.output and len(failed.output.strip().splitlines()) == 1
    cleaned = runner.invoke(cli, ["jobs", "cleanup", "--older-than", "0s", "--json"])
    assert json.loads(cleaned.output) == {"deleted": 1}
    assert runner.invoke(cli, ["jobs", "requeue", "--older-than", "0", "--json"]).exit_code == 0
    stats = runner.invoke(cli, ["jobs", "stats", "--json"])
    assert stats.exit_code == 0 and "counts" in json.loads(stats.output)
