"""POST /api/v1/discover, the job endpoint, POST /api/v1/feedback acting on the result, and the admin page
(Flask test client, real Postgres and Valkey; the job is run in this process with the tiny model)."""

from __future__ import annotations

import uuid

from markupsafe import escape
from support.discover import tiny_llm_folder  # noqa: F401  (fixture)
from web_fixtures import csrf_from

from recsys import jobs
from web.responses import DiscoverSubmission, Job, StoredFeedbackEvent

WORKER = "test-host:discover-api"


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def run_discover(client, headers, settings, body: dict, key: str | None = None) -> dict:
    extra = {"Idempotency-Key": key} if key else {}
    response = client.post("/api/v1/discover", json=body, headers={**headers, **extra})
    assert response.status_code == 202, response.get_data(as_text=True)
    DiscoverSubmission.model_validate(response.get_json())
    assert response.headers["Location"] == response.get_json()["status_url"]
    assert jobs.run_job(response.get_json()["job_id"], settings, worker=WORKER).status == "succeeded"
    job = client.get(response.get_json()["status_url"], headers=headers).get_json()
    Job.model_validate(job)
    return job


def test_discover_feedback_and_replacement_over_http(app, client, loaded_db, auth_headers, tiny_llm_folder):  # noqa: F811
    settings = loaded_db.with_(llm_model=tiny_llm_folder, batch_wait_ms=0)
    app.config["RECSYS_SETTINGS"] = settings
    body = {"need": "a present for a bag lover", "customer_id": 15781}
    job = run_discover(client, auth_headers, settings, body, key="shop-1")
    assert job["kind"] == "discover" and job["status"] == "succeeded"

    cached = client.post("/api/v1/discover", json=body, headers=auth_headers)
    assert cached.status_code == 200 and cached.get_json()["cached"]
    assert cached.get_json()["job_id"] == job["id"] and cached.get_json()["result"] == job["result"]

    group = next(g for g in job["result"]["groups"] if g["extras"])
    bought = group["items"][0]["stock_code"]
    event = {"event": "purchased", "stock_code": bought, "job_id": job["id"]}
    recorded = client.post("/api/v1/feedback", json=event, headers={**auth_headers, "Idempotency-Key": "sale-1"})
    assert recorded.status_code == 201, recorded.get_data(as_text=True)
    answer = recorded.get_json()
    StoredFeedbackEvent.model_validate(answer)
    assert answer["replacement"]["by"] == group["extras"][0] and answer["customer_id"] == 15781
    repeated = client.post("/api/v1/feedback", json=event, headers={**auth_headers, "Idempotency-Key": "sale-1"})
    assert repeated.status_code == 200 and repeated.get_json() == {**answer, "created": False}

    shown_now = client.get(f"/api/v1/jobs/{job['id']}", headers=auth_headers).get_json()["result"]
    assert group["extras"][0] in next(g for g in shown_now["groups"] if g["idea"] == group["idea"])["items"]
    history = client.get("/api/v1/customers/15781/history?n=1", headers=auth_headers).get_json()
    assert history["items"][0]["stock_code"] == bought

    assert error_of(client.post("/api/v1/feedback", json=event, headers=auth_headers), 409)["code"] == \
        "already_purchased"
    other = {"event": "clicked", "stock_code": group["items"][1]["stock_code"], "job_id": job["id"],
             "customer_id": 13047}
    assert error_of(client.post("/api/v1/feedback", json=other, headers=auth_headers), 409)["code"] == \
        "customer_mismatch"
    in_reserve = next(g for g in shown_now["groups"] if g["extras"])["extras"][0]["stock_code"]
    error_of(client.post("/api/v1/feedback", json={"event": "shown", "stock_code": in_reserve, "job_id": job["id"]},
                         headers=auth_headers), 400)
    missing = {"event": "shown", "stock_code": bought, "job_id": "00000000-0000-0000-0000-000000000001"}
    assert error_of(client.post("/api/v1/feedback", json=missing, headers=auth_headers), 404)["code"] == \
        "job_not_found"


def test_bad_discover_requests_are_400(client, loaded_db, auth_headers):
    for body in ({"need": ""}, {"need": "x" * 501}, {"need": "tea", "customer_id": "1"}, {"needs": "tea"},
                 {"need": "tea", "exclude_purchased": True}):
        error_of(client.post("/api/v1/discover", json=body, headers=auth_headers), 400)
    error_of(client.post("/api/v1/discover", json={"need": "tea"}), 401)
    document = client.get("/api/v1/openapi.json").get_json()
    assert "/discover" in document["paths"] and "409" in document["paths"]["/feedback"]["post"]["responses"]


def test_admin_page_shows_the_groups_and_the_replacement(app, admin_client, loaded_db, tiny_llm_folder):  # noqa: F811
    settings = loaded_db.with_(llm_model=tiny_llm_folder, batch_wait_ms=0)
    app.config["RECSYS_SETTINGS"] = settings
    page = admin_client.get("/admin/discover/")
    assert page.status_code == 200
    token = csrf_from(page.get_data(as_text=True))
    empty = admin_client.post("/admin/discover/", data={"csrf_token": token, "need": " ", "customer_id": "15781"})
    assert empty.status_code == 400 and "need must not be empty" in empty.get_data(as_text=True)
    sent = admin_client.post("/admin/discover/", data={"csrf_token": token, "need": "bags", "customer_id": "15781"})
    assert sent.status_code == 302
    job_id = sent.headers["Location"].split("job=")[1]
    assert jobs.run_job(job_id, settings, worker=WORKER).status == "succeeded"
    result = jobs.get_job(job_id, settings)["result"]
    html = admin_client.get(f"/admin/discover/?job={job_id}").get_data(as_text=True)
    for group in result["groups"]:
        assert str(escape(group["idea"]["description"])) in html
        for item in group["items"]:
            assert f'data-stock-code="{item["stock_code"]}"' in html
    job_page = admin_client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert f"/admin/discover/?job={job_id}" in job_page
    group = next(g for g in result["groups"] if g["extras"])
    bought, extra = group["items"][0], group["extras"][0]
    done = admin_client.post(f"/admin/discover/{job_id}/purchased",
                             data={"csrf_token": token, "stock_code": bought["stock_code"]}, follow_redirects=True)
    text = done.get_data(as_text=True)
    assert done.status_code == 200 and f"now shows {extra['stock_code']}" in text
    assert f'class="replaced" data-stock-code="{bought["stock_code"]}"' in text
    again = admin_client.post(f"/admin/discover/{job_id}/purchased",
                              data={"csrf_token": token, "stock_code": bought["stock_code"]})
    assert again.status_code == 409


def test_admin_discover_forms_refuse_a_missing_or_forged_csrf_token(admin_client, loaded_db):
    """The discover pages are forms of their own blueprint: a post without the session's token changes nothing."""
    from sqlalchemy import text

    from recsys.platform.db import get_engine

    def discover_jobs() -> int:
        with get_engine(loaded_db).connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs WHERE kind = 'discover'")).scalar_one()

    token = csrf_from(admin_client.get("/admin/discover/").get_data(as_text=True))
    before = discover_jobs()
    for form in ({"need": "bags"}, {"need": "bags", "csrf_token": "forged"}):
        refused = admin_client.post("/admin/discover/", data=form)
        assert refused.status_code == 400 and "did not come from this site" in refused.get_data(as_text=True)
    refused = admin_client.post(f"/admin/discover/{uuid.uuid4()}/purchased",
                                data={"stock_code": "85123A", "csrf_token": "forged"})
    assert refused.status_code == 400 and "did not come from this site" in refused.get_data(as_text=True)
    assert discover_jobs() == before
    assert admin_client.post("/admin/discover/", data={"need": " ", "csrf_token": token}).status_code == 400


def test_cli_discover(loaded_db, flushed_broker, tiny_llm_folder):  # noqa: F811
    import json

    from click.testing import CliRunner

    from recsys.cli import cli
    from recsys.config import set_settings

    settings = loaded_db.with_(llm_model=tiny_llm_folder, batch_wait_ms=0)
    set_settings(settings)
    runner = CliRunner()
    args = ["discover", "--customer", "15781", "--need", "a present for a bag lover", "--json"]
    queued = runner.invoke(cli, args)
    assert queued.exit_code == 0, queued.output
    job_id = json.loads(queued.output)["job_id"]
    assert jobs.run_job(job_id, settings, worker=WORKER).status == "succeeded"
    cached = runner.invoke(cli, args)
    assert cached.exit_code == 0 and json.loads(cached.output)["cached"]
    assert json.loads(cached.output)["result"]["groups"]
    shown = runner.invoke(cli, args[:-1])
    assert shown.exit_code == 0 and "cached" in shown.output
    for bad, message in [(["discover", "--need", " "], "need must not be empty"),
                         (["discover", "--need", "x" * 501], "longer than 500"),
                         (["discover", "--need", "tea", "--exclude-purchased"], "needs a customer_id")]:
        failed = runner.invoke(cli, bad)
        assert failed.exit_code == 2, (bad, failed.output)
        assert message in failed.output and len(failed.output.strip().splitlines()) == 1
