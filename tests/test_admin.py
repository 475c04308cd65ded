"""Admin pages: login and CSRF, every page renders the right data, the recommend form round trip, evaluation."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from web_fixtures import ADMIN_NAME, ADMIN_PASSWORD, csrf_from

from recsys import jobs
from recsys.cli import cli
from recsys.platform.db import get_engine
from recsys.platform.models import Job


def job_count(db) -> int:
    with get_engine(db).connect() as conn:
        return conn.execute(select(func.count()).select_from(Job)).scalar_one()


def html(response) -> str:
    return response.get_data(as_text=True)


def test_pages_need_a_login(client):
    response = client.get("/admin/customers/15781")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/admin/login?next=/admin/customers/15781")
    assert client.get("/").headers["Location"] == "/admin/"
    polled = client.get(f"/admin/jobs/{uuid.uuid4()}.json")
    assert polled.status_code == 401 and polled.get_json()["error"]["code"] == "unauthorized"


def test_repeated_failed_logins_lock_out_that_address_only(client, db):
    from recsys.platform.auth import LOGIN_FAILURES_ALLOWED, create_admin_user

    create_admin_user(ADMIN_NAME, ADMIN_PASSWORD, db)
    token = csrf_from(html(client.get("/admin/login")))
    for _ in range(LOGIN_FAILURES_ALLOWED):
        wrong = client.post("/admin/login", data={"username": ADMIN_NAME, "password": "guess", "csrf_token": token})
        assert wrong.status_code == 401
    locked = client.post("/admin/login", data={"username": ADMIN_NAME, "password": ADMIN_PASSWORD,
                                               "csrf_token": token})
    assert locked.status_code == 429 and "Too many failed logins" in html(locked)
    assert client.get("/admin/").status_code == 302

    elsewhere = client.application.test_client()
    other = {"REMOTE_ADDR": "10.0.0.7"}
    token = csrf_from(html(elsewhere.get("/admin/login", environ_base=other)))
    ok = elsewhere.post("/admin/login", data={"username": ADMIN_NAME, "password": ADMIN_PASSWORD,
                                              "csrf_token": token}, environ_base=other)
    assert ok.status_code == 302 and elsewhere.get("/admin/", environ_base=other).status_code == 200


def test_login_checks_password_and_csrf(client, db, runner):
    assert runner.invoke(cli, ["admin", "create-user", ADMIN_NAME, "--password", "short"]).exit_code == 2
    created = runner.invoke(cli, ["admin", "create-user", ADMIN_NAME, "--password", ADMIN_PASSWORD])
    assert created.exit_code == 0, created.output
    page = client.get("/admin/login")
    token = csrf_from(html(page))
    assert 'type="password"' in html(page)

    no_token = client.post("/admin/login", data={"username": ADMIN_NAME, "password": ADMIN_PASSWORD})
    assert no_token.status_code == 400 and "reload the page" in html(no_token)
    wrong = client.post("/admin/login", data={"username": ADMIN_NAME, "password": "wrong password",
                                              "csrf_token": token})
    assert wrong.status_code == 401 and "Wrong user name or password" in html(wrong)
    unknown = client.post("/admin/login", data={"username": "nobody", "password": ADMIN_PASSWORD,
                                                "csrf_token": token})
    assert unknown.status_code == 401

    evil = client.post("/admin/login", data={"username": ADMIN_NAME, "password": ADMIN_PASSWORD,
                                             "csrf_token": token, "next": "https://evil.example/admin"})
    assert evil.status_code == 302 and evil.headers["Location"] == "/admin/"
    cookie = client.get_cookie("recsys_session")
    assert cookie.http_only and cookie.same_site == "Lax"
    assert client.get("/admin/").status_code == 200

    logout_token = csrf_from(html(client.get("/admin/")))
    assert client.post("/admin/logout", data={"csrf_token": logout_token}).status_code == 302
    assert client.get("/admin/").status_code == 302


def test_dashboard(admin_client, loaded_db):
    page = html(admin_client.get("/admin/"))
    assert "Dashboard" in page and "purchases" in page and "embedded" in page
    assert "100.0%" in page  # every recommendable product has an embedding
    assert "Last hour" in page and "Result cache" in page and "none seen" in page  # no worker in this test


def test_products_search_and_product_page(admin_client, loaded_db):
    listing = html(admin_client.get("/admin/products"))
    assert "WHITE LOVEBIRD LANTERN" in listing and "POSTAGE" not in listing
    found = html(admin_client.get("/admin/products?q=lantern&mode=vector"))
    assert found.index("LANTERN") < found.index("</table>")
    hybrid = html(admin_client.get("/admin/products?q=lantern&mode=hybrid"))
    assert "hybrid search" in hybrid and "WHITE METAL LANTERN" in hybrid
    product = html(admin_client.get("/admin/products/22224"))
    assert "WHITE LOVEBIRD LANTERN" in product and "Similar products" in product and "WHITE METAL LANTERN" in product
    missing = admin_client.get("/admin/products/NOPE")
    assert missing.status_code == 404 and "No product" in html(missing)


def test_customers_and_history_pagination(admin_client, loaded_db, monkeypatch):
    import web.admin

    listing = html(admin_client.get("/admin/customers"))
    assert "15781" in listing and "United Kingdom" in listing
    assert admin_client.get("/admin/customers?id=15781").headers["Location"] == "/admin/customers/15781"
    monkeypatch.setattr(web.admin, "PER_PAGE", 2)
    first = html(admin_client.get("/admin/customers/15781"))
    assert "ALARM CLOCK BAKELIKE PINK" in first and "1–2 of 5" in first and "page=2" in first
    second = html(admin_client.get("/admin/customers/15781?page=2"))
    assert "ALARM CLOCK BAKELIKE PINK" not in second and "3–4 of 5" in second
    assert admin_client.get("/admin/customers/15781?page=zero").status_code == 400
    cold = html(admin_client.get("/admin/customers/424242"))
    assert "cold start" in cold


def test_recommend_form_round_trip(admin_client, loaded_db):
    page = html(admin_client.get("/admin/customers/15781"))
    token = csrf_from(page)
    form = {"csrf_token": token, "query": "BAG CHARM", "k": "3", "ranker": "retrieval", "explain": "on"}

    refused = admin_client.post("/admin/customers/15781/recommend", data={**form, "csrf_token": "forged"})
    assert refused.status_code == 400 and job_count(loaded_db) == 0
    invalid = admin_client.post("/admin/customers/15781/recommend", data={**form, "k": "99"})
    assert invalid.status_code == 400 and "k must be between 1 and 50" in html(invalid)
    assert job_count(loaded_db) == 0

    submitted = admin_client.post("/admin/customers/15781/recommend", data=form)
    assert submitted.status_code == 302
    location = submitted.headers["Location"]
    job_id = location.split("job=")[1]
    waiting = html(admin_client.get(location))
    assert f"/admin/jobs/{job_id}.json" in waiting and "refreshes when it finishes" in waiting
    assert admin_client.get(f"/admin/jobs/{job_id}.json").get_json()["status"] == "queued"

    jobs.run_job(job_id, worker=jobs.worker_identity(), settings=loaded_db)
    assert admin_client.get(f"/admin/jobs/{job_id}.json").get_json()["status"] == "succeeded"
    done = html(admin_client.get(location))
    assert "COPPER AND BRASS BAG CHARM" in done and "job details" in done

    cached = admin_client.post("/admin/customers/15781/recommend", data=form, follow_redirects=True)
    assert cached.status_code == 200 and "result cache" in html(cached) and "IVORY GOLD METAL BAG CHARM" in html(cached)
    assert job_count(loaded_db) == 1


def test_jobs_list_and_job_page(admin_client, loaded_db, monkeypatch):
    import web.admin

    first = jobs.submit_recommendation({"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"},
                                       settings=loaded_db)
    jobs.run_job(first.job_id, worker=jobs.worker_identity(), settings=loaded_db)
    second = jobs.submit_recommendation({"customer_id": 12583, "query": "night light", "k": 2,
                                         "ranker": "retrieval"}, settings=loaded_db)

    listing = html(admin_client.get("/admin/jobs"))
    assert str(first.job_id)[:8] in listing and str(second.job_id)[:8] in listing
    only_queued = html(admin_client.get("/admin/jobs?status=queued"))
    assert str(second.job_id)[:8] in only_queued and str(first.job_id)[:8] not in only_queued
    assert admin_client.get("/admin/jobs?status=bogus").status_code == 400
    monkeypatch.setattr(web.admin, "PER_PAGE", 1)
    assert "1–1 of 2" in html(admin_client.get("/admin/jobs"))
    monkeypatch.undo()

    page = html(admin_client.get(f"/admin/jobs/{first.job_id}"))
    for expected in ("Final order", "Candidates", "retrieval score", "Raw model output", "BAG CHARM",
                     "Pipeline stages"):
        assert expected in page, expected
    assert admin_client.get(f"/admin/jobs/{uuid.uuid4()}").status_code == 404
    assert admin_client.get("/admin/jobs/nonsense").status_code == 404

    queued_page = html(admin_client.get(f"/admin/jobs/{second.job_id}"))
    token = csrf_from(queued_page)
    cancelled = admin_client.post(f"/admin/jobs/{second.job_id}/cancel", data={"csrf_token": token},
                                  follow_redirects=True)
    assert "Job cancelled" in html(cancelled) and jobs.get_job(second.job_id, loaded_db)["status"] == "cancelled"


def test_evaluation_page(admin_client, db, tmp_path, monkeypatch):
    import web.admin

    empty = html(admin_client.get("/admin/evaluation"))
    assert "No evaluation yet" in empty
    assert admin_client.get("/admin/evaluation/plot.png").status_code == 404

    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    report = {
        "created_at": "2026-11-22 10:00:00",
        "metrics_table_markdown": "| ranker | HitRate@5 |\n|---|---:|\n| retrieval | 0.412 |\n| llm-listwise | 0.455 |",
        "plot_path": str(plot),
        "params": {"cutoff": "2011-10-01"},
    }
    monkeypatch.setattr(web.admin, "latest_report", lambda root: report)
    page = html(admin_client.get("/admin/evaluation"))
    assert "HitRate@5" in page and "llm-listwise" in page and "0.455" in page and "cutoff" in page
    assert 'src="/admin/evaluation/plot.png"' in page
    served = admin_client.get("/admin/evaluation/plot.png")
    assert served.status_code == 200 and served.mimetype == "image/png"

    report.pop("metrics_table_markdown")
    report["table_markdown"] = (
        "**Query personalization** (`query`): 200 cases (repeat 120, new 80)\n\n"
        "| ranker | NDCG@10 |\n|---|---:|\n| retrieval | 0.31 |\n| <script>x</script> | 0.4 |\n\n"
        "**Next purchase** (`next`): 150 cases\n\n| ranker | NDCG@10 |\n|---|---:|\n| popularity | 0.12 |\n"
    )
    page = html(admin_client.get("/admin/evaluation"))
    assert "<b>Query personalization</b> (<code>query</code>)" in page and "<b>Next purchase</b>" in page
    assert page.count('<table class="metrics">') == 2 and "&lt;script&gt;" in page and "<script>x" not in page
    report.pop("table_markdown")
    report["rows"] = [{"ranker": "popularity", "HitRate@5": 0.2}]
    assert "popularity" in html(admin_client.get("/admin/evaluation"))
