"""Admin pages read as a person would: figures in words and units, settings as lists, not JSON dumps."""

from __future__ import annotations

import re
import time

from recsys import jobs
from recsys.jobs.runner import worker_identity
from recsys.platform.db import get_engine
from recsys.recommend import cache

ISO_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")


def html(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.get_data(as_text=True)


def finished_job(settings, **request) -> str:
    outcome = jobs.submit_recommendation({"customer_id": 15781, "query": "BAG CHARM", "k": 3, **request}, settings)
    jobs.run_job(outcome.job_id, worker=worker_identity(), settings=settings)
    return str(outcome.job_id)


def test_dashboard_shows_jobs_per_minute_readable_times_and_charts(admin_client, loaded_db, flushed_broker):
    finished_job(loaded_db, ranker="retrieval")
    jobs.submit_recommendation({"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"},
                               loaded_db)  # a cache hit
    page = html(admin_client.get("/admin/"))
    assert "jobs per minute" in page and "jobs per second" not in page
    assert not ISO_TIMESTAMP.search(page)
    assert page.count('<figure class="chart"') == 3
    for chart in ("chart-jobs", "chart-latency", "chart-cache"):
        assert f'id="{chart}"' in page
    latency = page[page.index('id="chart-latency"'):page.index('id="chart-cache"')]
    assert "<circle" in latency and "p95" in latency
    cache_chart = page[page.index('id="chart-cache"'):]
    assert "hit rate: 50%</title>" in cache_chart  # one hit, one job created


def test_timeline_buckets_count_jobs_and_cache_hits(loaded_db, flushed_broker):
    finished_job(loaded_db, ranker="retrieval")
    for _ in range(3):
        jobs.submit_recommendation({"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"},
                                   loaded_db)
    timeline = jobs.job_timeline(loaded_db, hours=1, bucket_minutes=10)
    assert 6 <= len(timeline) <= 7 and timeline == sorted(timeline, key=lambda b: b["start"])
    assert sum(b["finished"] for b in timeline) == 1 and sum(b["cache_hits"] for b in timeline) == 3
    last = next(b for b in reversed(timeline) if b["finished"])
    assert last["jobs_per_minute"] == 0.1 and last["p50_ms"] is not None
    assert [b["cache_hit_rate"] for b in timeline if b["jobs_created"] or b["cache_hits"]] == [0.75]


def test_job_page_renders_ranker_info_as_a_list(admin_client, loaded_db):
    job_id = finished_job(loaded_db, ranker="copurchase", explain=True)
    page = html(admin_client.get(f"/admin/jobs/{job_id}"))
    info = page[page.index('id="ranker-info"'):]
    info = info[:info.index("</dl>")]
    assert "<dt>history items</dt><dd>5</dd>" in info and "{" not in info
    assert "retrieval order" in page  # the fallback said in words (nothing sells with a bag charm here)
    assert "matches &#39;BAG CHARM&#39;" in page


def test_jobs_list_has_duration_and_error_columns(admin_client, loaded_db):
    finished_job(loaded_db, ranker="retrieval")
    failed = jobs.submit_recommendation({"customer_id": 17850, "query": "lantern", "k": 2, "ranker": "retrieval"},
                                        loaded_db)
    with get_engine(loaded_db).begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET status = 'failed', error = 'failed after 3 attempts: boom', "
                             "finished_at = now() WHERE id = %s", (failed.job_id,))
    page = html(admin_client.get("/admin/jobs"))
    head = page[page.index("<thead>"):page.index("</thead>")]
    assert "duration" in head and "error" in head
    assert "failed after 3 attempts: boom" in page
    assert re.search(r'<td class="n">\d+(\.\d+)? (ms|s)</td>', page)
    assert not ISO_TIMESTAMP.search(page[page.index('id="jobs"'):])


def test_product_page_shows_bought_together_and_monthly_sales(admin_client, loaded_db):
    page = html(admin_client.get("/admin/products/22224"))
    assert 'id="bought-together"' in page and "No product was in the same order" in page  # no pair twice
    sales = page[page.index('id="sales"'):]
    assert "<td>2010-12</td>" in sales and '<td class="n">14</td>' in sales  # 2 + 12 lanterns in December


def test_evaluation_page_verdict_and_parameters(admin_client, db, monkeypatch):
    import web.admin

    empty = html(admin_client.get("/admin/evaluation"))
    assert "<code>recsys eval</code>" in empty

    def ranker(ndcg, delta=None, low=None, high=None, cases=300):
        entry = {"cases": cases, "segments": {"all": {"ndcg@10": ndcg}}}
        if delta is not None:
            entry["vs_retrieval_ndcg@10"] = {"delta": delta, "low": low, "high": high}
        return entry

    metrics = {"tasks": {
        "next": {"title": "Next purchase", "rankers": {
            "retrieval": ranker(0.163), "copurchase": ranker(0.191, 0.027, 0.012, 0.042),
            "llm-verbalizer": ranker(0.141, -0.022, -0.04, -0.004, cases=100)}},
        "query": {"title": "Query personalization", "rankers": {
            "retrieval": ranker(0.373), "llm-likelihood": ranker(0.376, 0.049, -0.003, 0.102, cases=30)}},
    }}
    report = {"created_at": "2026-11-22T10:00:00+00:00", "metrics": metrics, "table_markdown": "",
              "params": {"cutoff": "2011-11-01", "rankers": ["retrieval", "copurchase"], "limits": {"llm-listwise": 20},
                         "seed": 42}}
    monkeypatch.setattr(web.admin, "latest_report", lambda root: report)
    page = html(admin_client.get("/admin/evaluation"))
    assert ("Next purchase: copurchase wins — NDCG@10 0.191, +0.027 over retrieval order (95% interval +0.012 to "
            "+0.042, so the gain is real), on 300 cases.") in page
    assert "Surely worse than retrieval order on this task: llm-verbalizer (-0.022)." in page
    assert ("Query personalization: no ranker is surely better than retrieval order. The closest is "
            "llm-likelihood, +0.049 (95% interval -0.003 to +0.102, which includes zero), on 30 cases.") in page
    params = page[page.index('id="parameters"'):]
    params = params[:params.index("</dl>")]
    assert "<dt>rankers</dt><dd>retrieval, copurchase</dd>" in params and "<dd>llm-listwise 20</dd>" in params
    assert "{" not in params and "Report of 2026-11-22 10:00:00 UTC" in page


def test_cached_recommendation_carries_the_job_that_made_it(loaded_db, client, auth_headers, flushed_broker):
    job_id = finished_job(loaded_db, ranker="retrieval")
    answer = client.post("/api/v1/recommendations", headers=auth_headers,
                         json={"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"})
    assert answer.status_code == 200 and answer.get_json()["cached"]
    assert answer.get_json()["job_id"] == job_id and answer.get_json()["status_url"] == f"/api/v1/jobs/{job_id}"
    assert client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers).get_json()["status"] == "succeeded"
    now = int(time.time() // 60)
    assert sum(cache.hits_per_minute(loaded_db, now - 2, now + 1).values()) == 1
