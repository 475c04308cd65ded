"""The API's busiest paths (issue 16) against the real Postgres and Valkey: the cache key computed in SQL, hits
counted in the process, stored JSON passed through, bare driver statements, the rerank message pushed
without Celery's publishing machinery, which must be the very message Celery sends, and the relay that pushes
the API's messages (nothing accepted lost, whatever the broker does or when the server stops)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from sqlalchemy import text
from support.proxy import CuttingProxy
from support.waiting import wait_until

from recsys import jobs
from recsys.jobs import relay
from recsys.platform import broker
from recsys.platform.db import fetch_binary, get_engine, run_bare
from recsys.recommend import cache
from recsys.recommend.request import RecommendationRequest

WORKER = "test-host:1"


def payload(**changes) -> dict:
    return {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval", **changes}


def finished_job(settings) -> str:
    outcome = jobs.submit_recommendation(payload(), settings=settings)
    jobs.run_job(outcome.job_id, worker=WORKER, settings=settings)
    return str(outcome.job_id)


def scalar(settings, sql: str, **params):
    with get_engine(settings).begin() as conn:
        return conn.execute(text(sql), params).scalar()


def rerank_list(settings) -> list[dict]:
    """The rerank queue's messages, oldest first, without their random delivery tags."""
    raw = redis.Redis.from_url(settings.celery_broker_url).lrange("rerank", 0, -1)
    messages = [json.loads(message) for message in reversed(raw)]
    for message in messages:
        message["properties"].pop("delivery_tag")
    return messages


def test_the_pushed_rerank_message_is_the_one_celery_sends(flushed_broker):
    settings = flushed_broker
    broker.reset_clients()
    job_id = str(uuid.uuid4())
    app = broker.client(settings)
    app.send_task(broker.RERANK_TASK, args=[job_id], queue=broker.RERANK_QUEUE, task_id=job_id)
    broker.send_rerank(job_id, settings)  # a process's first message goes through send_task (and declares the queue)
    broker.send_rerank(job_id, settings)  # later ones are pushed on the kept connection
    celery_sent, first, pushed = rerank_list(settings)
    assert first == celery_sent and pushed == celery_sent
    assert json.dumps(pushed) == json.dumps(celery_sent), "same keys in the same order"

    redis.Redis.from_url(settings.celery_broker_url).delete("rerank")
    app.send_task(broker.RERANK_TASK, args=[job_id], queue=broker.RERANK_QUEUE, task_id=job_id, countdown=30)
    broker.send_rerank(job_id, settings, countdown=30)
    celery_later, pushed_later = rerank_list(settings)
    etas = [message["headers"].pop("eta") for message in (celery_later, pushed_later)]
    assert pushed_later == celery_later and all(etas)
    assert abs(time.mktime(time.strptime(etas[0][:19], "%Y-%m-%dT%H:%M:%S"))
               - time.mktime(time.strptime(etas[1][:19], "%Y-%m-%dT%H:%M:%S"))) <= 2


def test_the_templated_rerank_json_is_the_message_encoded_for_every_job_id(base_settings):
    app = broker.client(base_settings)
    for job_id in (str(uuid.uuid4()), str(uuid.uuid4())):
        fast, slow = json.loads(broker.rerank_json(app, job_id)), broker.rerank_message(app, job_id)
        assert fast["properties"].pop("delivery_tag") != slow["properties"].pop("delivery_tag")
        assert json.dumps(fast) == json.dumps(slow)


def test_withdrawing_answered_jobs_takes_only_their_rerank_messages_near_the_consuming_end(flushed_broker):
    settings = flushed_broker
    broker.reset_clients()
    ids = [str(uuid.uuid4()) for _ in range(8)]
    broker.client(settings).send_task(broker.RERANK_TASK, args=[ids[0]], queue=broker.RERANK_QUEUE, task_id=ids[0])
    for job_id in ids[1:6]:
        broker.send_rerank(job_id, settings)
    broker.send_rerank(ids[2], settings, countdown=30)  # a retry's message, with an eta
    # another task's message that carries one of the ids, on the same list: not a rerank, so it stays
    broker.client(settings).send_task(broker.SUBMIT_TASK, args=[{}], queue=broker.RERANK_QUEUE, task_id=ids[3])
    for job_id in ids[6:]:
        broker.send_rerank(job_id, settings)

    def waiting() -> list[tuple[str, str]]:
        return [(m["headers"]["task"], m["headers"]["id"]) for m in rerank_list(settings)]

    assert broker.withdraw_reranks([ids[0], ids[2], ids[3], str(uuid.uuid4())], settings) == 4
    assert waiting() == [(broker.RERANK_TASK, ids[1]), (broker.RERANK_TASK, ids[4]), (broker.RERANK_TASK, ids[5]),
                         (broker.SUBMIT_TASK, ids[3]), (broker.RERANK_TASK, ids[6]), (broker.RERANK_TASK, ids[7])]
    # one job: only the WITHDRAW_SCAN_PER_JOB oldest messages are looked at, so the newest stays for its consumer
    assert broker.WITHDRAW_SCAN_PER_JOB == 4
    assert broker.withdraw_reranks([ids[7]], settings) == 0
    assert broker.withdraw_reranks([ids[6], ids[7]], settings) == 2
    assert [job_id for _, job_id in waiting()] == [ids[1], ids[4], ids[5], ids[3]]
    assert broker.withdraw_reranks([], settings) == 0


def test_withdrawing_from_a_broker_that_is_down_leaves_the_messages_and_raises_nothing(tmp_path, caplog):
    from conftest import free_port

    from recsys.config import Settings

    settings = Settings(home=tmp_path / "no-broker", broker_port=free_port())
    try:
        assert broker.withdraw_reranks([str(uuid.uuid4())], settings) == 0
    finally:
        broker.reset_clients()
    assert "stay queued" in caplog.text


def test_a_push_to_a_broker_that_went_away_fails_fast_and_the_next_one_reconnects(tmp_path):
    from conftest import free_port

    from recsys.config import Settings
    from recsys.platform import embedded

    settings = Settings(home=tmp_path / "own-broker", broker_port=free_port())
    embedded.start_broker(settings)
    try:
        broker.send_rerank(str(uuid.uuid4()), settings)  # through send_task, which declares the queue
        broker.send_rerank(str(uuid.uuid4()), settings)  # pushed, on a connection the process keeps
        embedded.stop_broker(settings)
        started = time.monotonic()
        try:
            broker.send_rerank(str(uuid.uuid4()), settings)
            raise AssertionError("a push to a stopped broker succeeded")
        except broker.BrokerUnavailable:
            assert time.monotonic() - started < 5
        embedded.start_broker(settings)
        job_id = str(uuid.uuid4())
        broker.send_rerank(job_id, settings)
        assert [message["headers"]["id"] for message in rerank_list(settings)] == [job_id]
    finally:
        broker.reset_clients()
        embedded.stop_broker(settings)


def kept_pushers(settings) -> list:
    return broker._idle_pushers.get((os.getpid(), settings.celery_broker_url), [])


def test_a_push_that_does_not_wait_is_settled_by_the_next_push_on_its_connection(flushed_broker):
    settings = flushed_broker
    broker.reset_clients()
    ids = [str(uuid.uuid4()) for _ in range(5)]
    broker.send_rerank(ids[0], settings)  # through send_task, which declares the queue
    for job_id in ids[1:4]:
        broker.send_rerank(job_id, settings, wait=False)
    [pusher] = kept_pushers(settings)
    [unread_message] = pusher.unread[0]
    assert json.loads(unread_message)["headers"]["id"] == ids[3], "only the newest reply is unread"
    broker.send_rerank(ids[4], settings)  # waits: reads the earlier reply first, then its own
    assert pusher.unread is None and not pusher.connection.can_read(timeout=0), "no reply left on the connection"
    assert [message["headers"]["id"] for message in rerank_list(settings)] == ids
    broker.reset_clients()


def test_a_push_that_does_not_wait_after_the_broker_restarted_reaches_the_new_broker(tmp_path):
    from conftest import free_port

    from recsys.config import Settings
    from recsys.platform import embedded

    settings = Settings(home=tmp_path / "own-broker", broker_port=free_port())
    embedded.start_broker(settings)
    try:
        broker.send_rerank(str(uuid.uuid4()), settings)  # through send_task, which declares the queue
        broker.send_rerank(str(uuid.uuid4()), settings, wait=False)  # answered before the broker stops
        embedded.stop_broker(settings)
        embedded.start_broker(settings)
        job_id = str(uuid.uuid4())
        broker.send_rerank(job_id, settings, wait=False)  # the closed connection is noticed before writing to it
        wait_until(lambda: job_id in [message["headers"]["id"] for message in rerank_list(settings)], timeout=10,
                   what="the message in the restarted broker")
    finally:
        broker.reset_clients()
        embedded.stop_broker(settings)


def test_a_message_whose_reply_was_lost_is_sent_again_by_the_next_push(flushed_broker):
    broker.reset_clients()
    lost = []
    with CuttingProxy(flushed_broker.broker_port) as proxy:
        settings = flushed_broker.with_(broker_url=f"redis://127.0.0.1:{proxy.port}/0")
        try:
            declaring, connecting, cut, after = (str(uuid.uuid4()) for _ in range(4))
            broker.send_rerank(declaring, settings)
            broker.send_rerank(connecting, settings)  # the kept connection is made (its handshake is not cut)
            proxy.cut_next_reply()
            broker.send_rerank(cut, settings, wait=False, on_lost=lost.append)  # Redis takes it; its reply is lost
            broker.send_rerank(after, settings, on_lost=lost.append)
        finally:
            broker.reset_clients()
    # `cut` twice: taken before the connection died, and sent again because its reply never came
    sent = [message["headers"]["id"] for message in rerank_list(flushed_broker)]
    assert sent == [declaring, connecting, cut, cut, after]
    assert lost == []


def test_several_messages_go_in_one_push_in_the_order_given(flushed_broker):
    settings = flushed_broker
    broker.reset_clients()
    ids = [str(uuid.uuid4()) for _ in range(4)]
    broker.send_reranks(ids[:3], settings)  # the first through send_task, which declares the queue
    broker.send_reranks(ids[3:], settings, wait=False)
    broker.settle_pushes(settings)
    assert [message["headers"]["id"] for message in rerank_list(settings)] == ids
    [pusher] = kept_pushers(settings)
    assert pusher.unread is None and not pusher.connection.can_read(timeout=0), "no reply left on the connection"
    broker.send_rerank(ids[0], settings)
    messages = rerank_list(settings)
    assert messages[-1] == messages[0], "a message sent in a batch is the one sent alone"
    broker.reset_clients()


def lpush_calls(settings) -> int:
    stats = redis.Redis.from_url(settings.celery_broker_url).info("commandstats")
    return stats.get("cmdstat_lpush", {}).get("calls", 0)


def test_the_relay_sends_handed_over_jobs_in_order_in_fewer_pushes_than_jobs(flushed_broker):
    settings = flushed_broker
    broker.reset_clients()
    ids = [str(uuid.uuid4()) for _ in range(20)]
    before = lpush_calls(settings)
    for job_id in ids:
        relay.hand_over(job_id, settings)
    assert relay.flush()
    assert [message["headers"]["id"] for message in rerank_list(settings)] == ids
    assert lpush_calls(settings) - before < len(ids)
    broker.reset_clients()


def test_a_submission_the_broker_refused_is_cleared_for_the_sweeper_by_the_relay(loaded_db, flushed_broker, caplog):
    settings = loaded_db
    broker.reset_clients()
    jobs.submit_recommendation(payload(query="declares the queue"), settings=settings)
    queue = redis.Redis.from_url(settings.celery_broker_url)
    queue.delete("rerank")
    queue.set("rerank", "not a list")  # every LPUSH on it is refused (WRONGTYPE)
    refused = jobs.submit_recommendation(payload(query="refused"), settings=settings, wait_for_broker=False)
    assert refused.status == "queued"
    assert relay.flush()
    assert jobs.get_job(refused.job_id, settings)["timings"]["sent_at"] is None
    assert f"job {refused.job_id} stays queued until the sweeper re-sends it" in caplog.text
    queue.delete("rerank")
    taken = jobs.submit_recommendation(payload(query="taken"), settings=settings, wait_for_broker=False)
    assert relay.flush()
    assert jobs.get_job(taken.job_id, settings)["timings"]["sent_at"] is not None
    assert [message["headers"]["id"] for message in rerank_list(settings)] == [str(taken.job_id)]
    assert jobs.requeue_stale(settings, older_than_seconds=0) >= 1
    assert str(refused.job_id) in [message["headers"]["id"] for message in rerank_list(settings)]
    broker.reset_clients()


@pytest.mark.timeout(120)
def test_a_submission_while_the_broker_is_down_is_left_to_the_sweeper_by_the_relay(loaded_db, flushed_broker, caplog):
    from conftest import free_port

    down = loaded_db.with_(broker_port=free_port())
    outcome = jobs.submit_recommendation(payload(query="broker down"), settings=down, wait_for_broker=False)
    assert outcome.status == "queued" and outcome.created
    assert relay.flush()
    assert jobs.get_job(outcome.job_id, loaded_db)["timings"]["sent_at"] is None
    assert f"job {outcome.job_id} stays queued until the sweeper re-sends it" in caplog.text
    assert jobs.requeue_stale(loaded_db, older_than_seconds=0) == 1
    assert [message["headers"]["id"] for message in rerank_list(loaded_db)] == [str(outcome.job_id)]


def test_a_process_that_ends_sends_what_it_handed_to_its_relay_first(flushed_broker):
    job_id = str(uuid.uuid4())
    program = ("import sys; from recsys.config import Settings; from recsys.jobs import relay; "
               "relay.hand_over(sys.argv[1], Settings.from_env())")
    env = {**os.environ, "CELERY_BROKER_URL": flushed_broker.celery_broker_url}
    subprocess.run([sys.executable, "-c", program, job_id], env=env, check=True, timeout=120)
    assert [message["headers"]["id"] for message in rerank_list(flushed_broker)] == [job_id]


def test_the_cache_key_is_the_documented_hash_and_moves_with_what_changes_answers(loaded_db, flushed_broker):
    engine = get_engine(loaded_db)
    for asked in (payload(), payload(customer_id=None), payload(customer_id=99999)):
        request = RecommendationRequest.from_dict(asked).with_defaults(loaded_db)
        with engine.connect() as conn:
            prints = cache.fingerprints(conn, request.customer_id)
            key = cache.cache_key(conn, request, loaded_db)
        documented = cache.key_text(cache.settled_digest(request, loaded_db), prints)
        assert key == hashlib.sha256(documented.encode()).hexdigest()

    request = RecommendationRequest.from_dict(payload()).with_defaults(loaded_db)
    with engine.connect() as conn:
        before = cache.cache_key(conn, request, loaded_db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE catalog_version SET version = version + 1"))
    with engine.connect() as conn:
        assert cache.cache_key(conn, request, loaded_db) != before
        assert cache.cache_key(conn, request.model_copy(update={"k": 4}), loaded_db) != before


def test_a_new_purchase_misses_the_cache(loaded_db, flushed_broker):
    finished_job(loaded_db)
    assert jobs.submit_recommendation(payload(), settings=loaded_db).cached
    with get_engine(loaded_db).begin() as conn:
        conn.execute(text(
            "INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity, "
            "unit_price, invoiced_at, country) SELECT sha256(row_hash), invoice_no, stock_code, customer_id, "
            "description, quantity, unit_price, invoiced_at + interval '1 day', country "
            "FROM purchases WHERE customer_id = 15781 LIMIT 1"))
    assert not jobs.submit_recommendation(payload(), settings=loaded_db).cached


def test_cache_hits_are_written_by_the_flusher_within_a_moment(loaded_db, flushed_broker):
    finished_job(loaded_db)
    hits = [jobs.submit_recommendation(payload(), settings=loaded_db) for _ in range(3)]
    assert all(hit.cached for hit in hits)
    wait_until(lambda: scalar(loaded_db, "SELECT hits FROM result_cache") == 3, 10,
               "the flusher thread to write the entry's hits")
    assert scalar(loaded_db, "SELECT last_hit_at > now() - interval '1 minute' FROM result_cache")
    client = redis.Redis.from_url(loaded_db.celery_broker_url)
    assert sum(int(client.get(key)) for key in client.keys(f"{cache.HITS_KEY_PREFIX}*")) == 3


def test_a_job_and_a_cached_answer_carry_the_stored_json_unchanged(loaded_db, client, auth_headers, flushed_broker):
    job_id = finished_job(loaded_db)
    shown = json.loads(json.dumps(jobs.get_job(job_id, loaded_db)))
    read = client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers)
    assert read.status_code == 200 and read.mimetype == "application/json" and read.data.endswith(b"}\n")
    assert read.get_json() == shown and list(read.get_json()) == list(shown)
    assert "Set-Cookie" not in read.headers

    answer = client.post("/api/v1/recommendations", headers=auth_headers, json=payload())
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    body = answer.get_json()
    assert list(body) == ["job_id", "status", "cached", "created", "status_url", "result"]
    assert body["result"] == shown["result"] and body["job_id"] == job_id and body["cached"]


def test_bare_statements_and_submits_survive_a_dropped_connection(loaded_db, flushed_broker):
    def backend(db):
        return db.execute("SELECT pg_backend_pid()").fetchone()[0]

    first = run_bare(loaded_db, backend)
    assert scalar(loaded_db, "SELECT pg_terminate_backend(:pid)", pid=first)
    wait_until(lambda: not scalar(loaded_db, "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid", pid=first),
               10, "the backend to go")
    assert run_bare(loaded_db, backend) != first

    dropped = run_bare(loaded_db, backend)
    scalar(loaded_db, "SELECT pg_terminate_backend(:pid)", pid=dropped)
    wait_until(lambda: not scalar(loaded_db, "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid", pid=dropped),
               10, "the backend to go")
    outcome = jobs.submit_recommendation(payload(query="lantern"), settings=loaded_db, idempotency_key="dropped-1")
    assert outcome.created and jobs.count_jobs(loaded_db) == 1
    again = jobs.submit_recommendation(payload(query="lantern"), settings=loaded_db, idempotency_key="dropped-1")
    assert again.job_id == outcome.job_id and not again.created and jobs.count_jobs(loaded_db) == 1


def test_rows_fetched_in_binary_are_the_rows_the_text_protocol_gives(db):
    """The candidate statement's rows come in binary: the same values and types as `conn.execute` gives."""
    from sqlalchemy.exc import DBAPIError

    statement = text(
        """
        SELECT n, 'code ' || n AS code, n % 2 = 0 AS even, 1 - 1 / (n + 0.3::float8) AS similarity,
               CASE WHEN n > 3 THEN extract(epoch FROM interval '1 day' * n) / 86400.0 END AS days,
               CAST(:missing AS float8) AS missing
        FROM generate_series(1, CAST(:count AS int)) AS n ORDER BY n
        """
    )
    with get_engine(db).begin() as conn:
        expected = [tuple(row) for row in conn.execute(statement, {"count": 6, "missing": None}).all()]
        fetched = fetch_binary(conn, statement, {"count": 6, "missing": None})
        assert fetched == expected and len(fetched) == 6
        assert [list(map(type, row)) for row in fetched] == [list(map(type, row)) for row in expected]
    with get_engine(db).begin() as conn, pytest.raises(DBAPIError, match="division by zero"):
        fetch_binary(conn, text("SELECT 1 / (CAST(:zero AS int))"), {"zero": 0})


def test_frozen_objects_are_left_out_of_full_collections():
    """Web and worker processes freeze what they loaded: a full collection then skips it (the worker's took
    350-380 ms with the embedding model loaded)."""
    import gc

    from recsys.platform.process import freeze_loaded_objects

    before = gc.get_freeze_count()
    held = [{"loaded": i} for i in range(1000)]
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() >= before + len(held)
    finally:
        gc.unfreeze()


@pytest.mark.timeout(180)
def test_a_server_stopped_right_after_its_answers_has_sent_every_message(loaded_db, flushed_broker, tmp_path):
    """SIGTERM to `recsys serve`'s gunicorn right after the last 202: each worker flushes its relay as it exits."""
    import signal

    import requests
    from conftest import free_port, worker_env

    from recsys.cli.web import gunicorn_argv
    from recsys.platform.auth import create_api_key

    key = create_api_key(f"relay-at-exit-{uuid.uuid4().hex[:8]}", loaded_db)
    port = free_port()
    with open(tmp_path / "gunicorn.log", "ab") as log:
        server = subprocess.Popen(gunicorn_argv(loaded_db.with_(web_port=port), workers=2, threads=4),
                                  env=worker_env(loaded_db), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/v1"
    headers = {"Authorization": f"Bearer {key}"}

    def answers() -> bool:
        try:
            return requests.get(f"{base}/health", timeout=2).status_code in (200, 503)
        except requests.RequestException:
            return server.poll() is not None

    try:
        wait_until(answers, timeout=90, what="gunicorn to answer")
        assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
        with requests.Session() as session:
            accepted = [session.post(f"{base}/recommendations", json=payload(query=f"at exit {i}"), headers=headers,
                                     timeout=30).json()["job_id"] for i in range(40)]
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    assert sorted(message["headers"]["id"] for message in rerank_list(loaded_db)) == sorted(accepted)
