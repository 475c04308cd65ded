"""The JSON API: auth, every route's answers, bad input as 4xx JSON that changes nothing, and the OpenAPI document."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from recsys import jobs
from recsys.cli import cli
from recsys.platform.db import get_engine
from recsys.platform.models import FeedbackEvent, Job
from web.openapi import api_routes


def count(db, model) -> int:
    with get_engine(db).connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


# ---------------------------------------------------------------- open endpoints


def test_health_is_open_and_reports_services(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["database"]["ok"] and body["broker"]["ok"]
    assert body["status"] in {"ok", "degraded"}
    assert body["worker"]["ok"] is False  # no worker runs in this test


def test_health_is_503_when_the_broker_is_down(db):
    from conftest import free_port

    from web import create_app

    app = create_app(db.with_(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    response = app.test_client().get("/api/v1/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable" and body["database"]["ok"] and not body["broker"]["ok"]


def test_openapi_documents_every_route_and_nothing_else(app, client):
    document = client.get("/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    registered = {(path, method) for path, method, _ in api_routes(app)}
    assert registered == documented
    for path, method in registered:
        op = document["paths"][path][method]
        assert op["summary"] and op["responses"]
        for name in [p for p in path.split("/") if p.startswith("{")]:
            assert any(p["in"] == "path" and p["name"] == name[1:-1] for p in op.get("parameters", [])), path
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" in document["paths"]["/recommendations"]["post"]["responses"]


def test_metrics_are_prometheus_text(client, auth_headers):
    client.get("/api/v1/products/NOPE", headers=auth_headers)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'recsys_http_requests_total{endpoint="/api/v1/products/<stock_code>",method="GET",status="404"}' in text
    assert "recsys_http_request_duration_seconds_bucket" in text
    assert 'recsys_jobs{status="queued"}' in text
    assert "recsys_cache_hits" in text


# ---------------------------------------------------------------- auth


def test_missing_unknown_and_revoked_keys_get_401(client, db, api_key, runner):
    error = assert_error(client.get("/api/v1/products/22224"), 401, "unauthorized")
    assert "Bearer" in error["message"]
    assert client.get("/api/v1/products/22224").headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(client.get("/api/v1/products/22224", headers={"Authorization": "Bearer rsk_nope"}), 401)
    assert_error(client.get("/api/v1/products/22224", headers={"Authorization": f"Basic {api_key}"}), 401)
    ok = client.get("/api/v1/products/22224", headers={"Authorization": f"Bearer {api_key}"})
    assert ok.status_code == 404  # authenticated; the product just is not in an empty catalog
    result = runner.invoke(cli, ["apikey", "revoke", "tests"])
    assert result.exit_code == 0, result.output
    assert_error(client.get("/api/v1/products/22224", headers={"Authorization": f"Bearer {api_key}"}), 401)
    before = count(db, Job)
    response = client.post("/api/v1/recommendations", json={"customer_id": 1, "query": "x"},
                           headers={"Authorization": f"Bearer {api_key}"})
    assert_error(response, 401)
    assert count(db, Job) == before


def test_apikey_cli_prints_the_key_once_and_stores_only_its_hash(runner, db):
    from recsys.platform.auth import hash_key, verify_api_key
    from recsys.platform.models import ApiKey

    created = runner.invoke(cli, ["apikey", "create", "partner-a"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("rsk_") and len(key) > 40
    assert verify_api_key(key, db).name == "partner-a"
    with get_engine(db).connect() as conn:
        stored = conn.execute(select(ApiKey.key_hash, ApiKey.key_prefix)).one()
    assert stored.key_hash == hash_key(key) and key not in stored.key_hash and key.startswith(stored.key_prefix)
    assert runner.invoke(cli, ["apikey", "create", "partner-a"]).exit_code == 2
    listed = runner.invoke(cli, ["apikey", "list", "--json"])
    assert json.loads(listed.stdout)[0]["active"] is True and key not in listed.stdout
    assert runner.invoke(cli, ["apikey", "revoke", "partner-a"]).exit_code == 0
    assert runner.invoke(cli, ["apikey", "revoke", "partner-a"]).exit_code == 2
    assert verify_api_key(key, db) is None


# ---------------------------------------------------------------- recommendations and jobs


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "invalid_json"),
        ('{"customer_id": 15781, "query": "BAG CHARM"', "invalid_json"),
        ("[1, 2]", "invalid_request"),
        ("null", "invalid_request"),
        ('{"customer_id": "15781", "query": "BAG CHARM"}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "k": 0}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "k": 51}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "k": "3"}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "k": true}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "explain": "yes"}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "ranker": "nope"}', "invalid_request"),
        ('{"customer_id": 15781, "query": "BAG CHARM", "colour": "red"}', "invalid_request"),
        ('{"customer_id": 99999999999999999999, "query": "x"}', "invalid_request"),
        ('{"customer_id": 15781, "query": "a\\u0000b"}', "invalid_request"),
        ('{"k": 3}', "invalid_request"),
        ("[" * 5000 + "]" * 5000, "invalid_json"),
    ],
)
def test_bad_recommendation_requests_are_400_and_change_nothing(client, db, auth_headers, body, code):
    response = client.post("/api/v1/recommendations", data=body, content_type="application/json",
                           headers=auth_headers)
    assert_error(response, 400, code)
    assert count(db, Job) == 0


def test_non_json_and_oversized_bodies(client, db, auth_headers):
    response = client.post("/api/v1/recommendations", data="customer_id=1", headers=auth_headers,
                           content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")
    big = json.dumps({"customer_id": 15781, "query": "x" * 100_000})
    error = assert_error(client.post("/api/v1/recommendations", data=big, content_type="application/json",
                                     headers=auth_headers), 413, "request_entity_too_large")
    assert "bytes" in error["message"]
    assert count(db, Job) == 0


def test_submit_poll_and_cached_answer(client, loaded_db, auth_headers):
    payload = {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"}
    response = client.post("/api/v1/recommendations", json=payload, headers=auth_headers)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    job_id = body["job_id"]
    assert body["status"] == "queued" and body["cached"] is False
    assert response.headers["Location"] == body["status_url"] == f"/api/v1/jobs/{job_id}"

    queued = client.get(body["status_url"], headers=auth_headers).get_json()
    assert queued["status"] == "queued" and queued["result"] is None

    jobs.run_job(job_id, worker=jobs.worker_identity(), settings=loaded_db)
    done = client.get(body["status_url"], headers=auth_headers)
    assert done.status_code == 200
    job = done.get_json()
    assert job["status"] == "succeeded" and job["timings"]["finished_at"]
    items = job["result"]["items"]
    assert {i["stock_code"] for i in items} == {"90001B", "90001C", "90001D"}  # the notebook's three bag charms

    again = client.post("/api/v1/recommendations", json=payload, headers=auth_headers)
    assert again.status_code == 200
    cached = again.get_json()
    assert cached["cached"] is True and cached["result"]["items"] == items
    assert count(loaded_db, Job) == 1


def test_idempotency_key_returns_the_same_job(client, loaded_db, auth_headers):
    payload = {"customer_id": 15781, "query": "lantern", "k": 2, "ranker": "retrieval"}
    headers = {**auth_headers, "Idempotency-Key": "order-42"}
    first = client.post("/api/v1/recommendations", json=payload, headers=headers)
    second = client.post("/api/v1/recommendations", json=payload, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.get_json()["job_id"] == second.get_json()["job_id"]
    assert first.get_json()["created"] is True and second.get_json()["created"] is False
    conflict = client.post("/api/v1/recommendations", json={**payload, "k": 3}, headers=headers)
    assert_error(conflict, 400, "invalid_request")
    assert_error(client.post("/api/v1/recommendations", json=payload,
                             headers={**auth_headers, "Idempotency-Key": "x" * 201}), 400)
    assert count(loaded_db, Job) == 1


def test_unknown_customer_is_a_flagged_cold_start(client, loaded_db, auth_headers):
    response = client.post("/api/v1/recommendations", json={"customer_id": 424242, "query": "lantern", "k": 2,
                                                            "ranker": "retrieval"}, headers=auth_headers)
    assert response.status_code == 202
    job_id = response.get_json()["job_id"]
    jobs.run_job(job_id, worker=jobs.worker_identity(), settings=loaded_db)
    result = client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers).get_json()["result"]
    assert result["cold_start"] is True and len(result["items"]) == 2 and result["notes"]


def test_unknown_and_malformed_job_ids_are_404(client, auth_headers):
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=auth_headers), 404, "not_found")
    assert_error(client.get("/api/v1/jobs/not-a-uuid", headers=auth_headers), 404, "not_found")


# ---------------------------------------------------------------- catalog reads


def test_product_and_similar(client, loaded_db, auth_headers):
    product = client.get("/api/v1/products/22224", headers=auth_headers).get_json()
    assert product["description"] == "WHITE LOVEBIRD LANTERN" and product["embedded"] is True
    similar = client.get("/api/v1/products/22224/similar?k=3", headers=auth_headers).get_json()
    assert similar["count"] == 3 and "22224" not in [h["stock_code"] for h in similar["items"]]
    assert similar["items"][0]["stock_code"] == "71053"  # the other lantern
    assert_error(client.get("/api/v1/products/NOPE", headers=auth_headers), 404, "product_not_found")
    assert_error(client.get("/api/v1/products/NOPE/similar", headers=auth_headers), 404, "product_not_found")
    assert_error(client.get("/api/v1/products/22224/similar?k=0", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/products/22224/similar?k=ten", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/products/a%00b", headers=auth_headers), 404)


def test_search(client, loaded_db, auth_headers):
    hits = client.get("/api/v1/search?q=lantern&k=2", headers=auth_headers).get_json()
    assert {h["stock_code"] for h in hits["items"]} == {"71053", "22224"}
    hybrid = client.get("/api/v1/search?q=lantern&k=2&hybrid=true", headers=auth_headers).get_json()
    assert hybrid["hybrid"] is True and hybrid["items"][0]["stock_code"] in {"71053", "22224"}
    excluded = client.get("/api/v1/search?q=lantern&k=3&customer_id=15781&exclude_purchased=1",
                          headers=auth_headers).get_json()
    assert "22224" not in [h["stock_code"] for h in excluded["items"]]
    assert_error(client.get("/api/v1/search", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/search?q=lantern&k=101", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/search?q=lantern&exclude_purchased=true", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/search?q=lantern&hybrid=maybe", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/search?q=lantern&hybrid=1&exclude_purchased=1&customer_id=15781",
                            headers=auth_headers), 400)


def test_customer_history(client, loaded_db, auth_headers):
    body = client.get("/api/v1/customers/15781/history?n=2", headers=auth_headers).get_json()
    assert body["count"] == 2 and body["items"][0]["stock_code"] == "22728"  # most recent first
    seed = client.get("/api/v1/customers/15781/history?n=3&order=seed", headers=auth_headers).get_json()
    assert [i["description"] for i in seed["items"]] == [
        "EDWARDIAN PARASOL NATURAL", "BLUE STRIPE CERAMIC DRAWER KNOB", "WHITE LOVEBIRD LANTERN"]
    assert_error(client.get("/api/v1/customers/424242/history", headers=auth_headers), 404, "customer_not_found")
    assert_error(client.get("/api/v1/customers/15781/history?n=0", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/customers/15781/history?order=random", headers=auth_headers), 400)
    assert_error(client.get("/api/v1/customers/99999999999999999999/history", headers=auth_headers), 404)


# ---------------------------------------------------------------- feedback


def test_feedback_is_validated_and_stored(client, loaded_db, auth_headers):
    event = {"event": "clicked", "stock_code": "22224", "customer_id": 15781, "position": 2}
    response = client.post("/api/v1/feedback", json=event, headers=auth_headers)
    assert response.status_code == 201
    assert response.get_json()["event"] == "clicked" and response.get_json()["id"]
    unknown_job = client.post("/api/v1/feedback", json={**event, "job_id": str(uuid.uuid4())}, headers=auth_headers)
    assert unknown_job.status_code == 404, "an event about a job must name a job that exists"
    for bad in (
        {**event, "event": "liked"},
        {**event, "stock_code": "NOPE"},
        {**event, "stock_code": 22224},
        {**event, "customer_id": -1},
        {**event, "job_id": "abc"},
        {**event, "position": 0},
        {**event, "extra": 1},
        {"stock_code": "22224"},
    ):
        assert_error(client.post("/api/v1/feedback", json=bad, headers=auth_headers), 400, "invalid_request")
    assert count(loaded_db, FeedbackEvent) == 1


# ---------------------------------------------------------------- framework errors


def test_unknown_paths_and_wrong_methods_are_json(client, auth_headers):
    assert_error(client.get("/api/v1/nothing-here", headers=auth_headers), 404, "not_found")
    response = client.delete("/api/v1/recommendations", headers=auth_headers)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_errors_are_logged_500s_without_a_trace(db):
    from web import create_app

    app = create_app(db)

    @app.get("/api/v1/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/api/v1/boom")
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in error["message"]


def test_serve_builds_a_gunicorn_command_without_importing_web(db):
    import subprocess
    import sys

    from recsys.cli.web import gunicorn_argv

    argv = gunicorn_argv(db.with_(web_port=8123), workers=2, threads=4)
    assert argv[1:3] == ["-m", "gunicorn"] and argv[-1] == "web:create_app()"
    assert "127.0.0.1:8123" in argv and "gthread" in argv
    check = "import sys, recsys.cli, recsys.jobs, recsys.platform.auth; sys.exit('web' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


def test_api_key_cache_honours_revocation_after_its_ttl(db):
    from recsys.platform.auth import ApiKeyCache, create_api_key, revoke_api_key

    now = [100.0]
    cache = ApiKeyCache(ttl=2.0, clock=lambda: now[0])
    key = create_api_key("cached", db)
    assert cache.verify(key, db).name == "cached"
    revoke_api_key("cached", db)
    now[0] += 1.0
    assert cache.verify(key, db) is not None  # still inside the TTL
    now[0] += 1.5
    assert cache.verify(key, db) is None
    assert cache.verify("rsk_unknown", db) is None and cache.verify(None, db) is None
