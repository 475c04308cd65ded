"""Feedback that acts, against the real Postgres: checked against the job it names, purchases recorded
as history, nothing recorded twice, and the shown-but-never-bought signal for rankers."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from recsys import feedback, jobs
from recsys.catalog.history import recent_histories
from recsys.feedback import FeedbackEvent, FeedbackRejected
from recsys.platform.db import get_engine
from recsys.recommend.request import RequestError

WORKER = "test-host:feedback"


def event(**fields) -> FeedbackEvent:
    return FeedbackEvent.from_dict(fields)


def count(settings, sql: str, **params) -> int:
    with get_engine(settings).connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


@pytest.fixture
def finished_job(loaded_db, flushed_broker) -> dict:
    """A succeeded `retrieval` recommendation job for customer 15781."""
    settings = loaded_db.with_(batch_wait_ms=0)
    submitted = jobs.submit_recommendation(
        {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"}, settings
    )
    assert jobs.run_job(submitted.job_id, settings, worker=WORKER).status == "succeeded"
    return jobs.get_job(submitted.job_id, settings)


def test_events_are_checked_against_the_job_they_name(loaded_db, finished_job):
    job_id = finished_job["id"]
    shown = [item["stock_code"] for item in finished_job["result"]["items"]]
    for position, code in enumerate(shown, 1):
        stored = feedback.record(event(event="shown", stock_code=code, job_id=job_id, position=position), loaded_db)
        assert stored["customer_id"] == 15781 and stored["purchase"] is None and stored["created"]

    not_shown = "21754"
    assert not_shown not in shown
    with pytest.raises(RequestError, match="not among the products"):
        feedback.record(event(event="clicked", stock_code=not_shown, job_id=job_id), loaded_db)
    with pytest.raises(FeedbackRejected) as other_customer:
        feedback.record(event(event="clicked", stock_code=shown[0], job_id=job_id, customer_id=13047), loaded_db)
    assert other_customer.value.status == 409 and other_customer.value.code == "customer_mismatch"
    with pytest.raises(FeedbackRejected) as unknown_job:
        feedback.record(event(event="shown", stock_code=shown[0], job_id="00000000-0000-0000-0000-000000000000"),
                        loaded_db)
    assert unknown_job.value.status == 404
    with pytest.raises(RequestError, match="unknown stock_code"):
        feedback.record(event(event="shown", stock_code="NOPE"), loaded_db)
    with pytest.raises(RequestError, match="needs a customer_id"):
        feedback.record(event(event="purchased", stock_code=shown[0]), loaded_db)
    assert count(loaded_db, "SELECT count(*) FROM feedback_events") == len(shown)


def test_a_purchase_reaches_the_history_once(loaded_db, finished_job):
    job_id = finished_job["id"]
    code = finished_job["result"]["items"][1]["stock_code"]
    before = count(loaded_db, "SELECT count(*) FROM purchases WHERE customer_id = 15781")
    answer = feedback.record(event(event="purchased", stock_code=code, job_id=job_id), loaded_db)
    assert answer["purchase"]["invoice_no"].startswith("FB") and answer["replacement"] is None
    assert recent_histories([15781], 1, loaded_db)[15781][0].stock_code == code
    assert count(loaded_db, "SELECT count(*) FROM purchases WHERE customer_id = 15781") == before + 1

    with pytest.raises(FeedbackRejected) as twice:
        feedback.record(event(event="purchased", stock_code=code, job_id=job_id), loaded_db)
    assert twice.value.code == "already_purchased"
    assert count(loaded_db, "SELECT count(*) FROM purchases WHERE source = 'feedback'") == 1


def test_an_idempotency_key_records_nothing_twice(loaded_db):
    first = feedback.record(event(event="purchased", stock_code="22728", customer_id=15781), loaded_db,
                            idempotency_key="order-7")
    again = feedback.record(event(event="purchased", stock_code="22728", customer_id=15781), loaded_db,
                            idempotency_key="order-7")
    assert again == {**first, "created": False}
    assert count(loaded_db, "SELECT count(*) FROM purchases WHERE source = 'feedback'") == 1
    with pytest.raises(FeedbackRejected) as reused:
        feedback.record(event(event="purchased", stock_code="21754", customer_id=15781), loaded_db,
                        idempotency_key="order-7")
    assert reused.value.code == "idempotency_key_reused"
    with pytest.raises(RequestError, match="idempotency key"):
        feedback.record(event(event="shown", stock_code="21754"), loaded_db, idempotency_key=" ")
    assert count(loaded_db, "SELECT count(*) FROM feedback_events") == 1


def test_a_purchase_by_a_new_customer_creates_them(loaded_db):
    feedback.record(event(event="purchased", stock_code="21754", customer_id=55555), loaded_db)
    history = recent_histories([55555], 5, loaded_db)[55555]
    assert [h.stock_code for h in history] == ["21754"]
    assert count(loaded_db, "SELECT purchase_count FROM customers WHERE customer_id = 55555") == 1


def test_shown_and_never_bought_is_a_signal_for_rankers(loaded_db):
    for code in ("21754", "21754", "82482", "22728"):
        feedback.record(event(event="shown", stock_code=code, customer_id=13047), loaded_db)
    feedback.record(event(event="clicked", stock_code="23206", customer_id=13047), loaded_db)
    feedback.record(event(event="purchased", stock_code="82482", customer_id=13047), loaded_db)
    signal = feedback.shown_not_bought([13047, 15781], loaded_db)
    bought_before = {h.stock_code for h in recent_histories([13047], 1000, loaded_db)[13047]}
    expected = {code: n for code, n in {"21754": 2, "22728": 1}.items() if code not in bought_before}
    assert signal == {13047: expected, 15781: {}}
