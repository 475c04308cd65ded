"""Feedback events from shops and the admin pages: what was shown, clicked or purchased, and what it changes.

The one place events are checked, stored and acted on (the views only parse the body and call `record`):
- an event that names a job must name a product that job's result showed, and the job's customer;
- `purchased` records a purchase row for the customer (`purchases.source = 'feedback'`), so their
  history, history vector and result-cache key change at once; a customer the shop did not know
  becomes a customer with that one purchase;
- `purchased` on a discover result replaces the product in its group with the group's first extra;
  the job's stored result shows the new state and what was replaced;
- an Idempotency-Key makes a retried report record nothing twice and get the first answer back.
`shown_not_bought` gives rankers the products a customer was shown and never bought.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field
from sqlalchemy import Connection, text

from recsys.config import Settings
from recsys.platform import models
from recsys.platform.bodies import Body, CustomerId, RequestError, StockCode
from recsys.platform.db import get_engine

MAX_POSITION = 1000
FEEDBACK_INVOICE_PREFIX = "FB"


class FeedbackEvent(Body):
    """What a customer did with a recommended product."""

    event: Literal[models.FEEDBACK_EVENTS]
    stock_code: StockCode
    customer_id: CustomerId | None = None
    job_id: Annotated[uuid.UUID, Field(strict=False)] | None = Field(
        None, description="the job whose result showed the product")
    position: Annotated[int, Field(ge=1, le=MAX_POSITION)] | None = Field(
        None, description="the rank it was shown at, from 1")


class FeedbackRejected(RequestError):
    """An event that contradicts what the system holds (HTTP 404/409 rather than 400); nothing is stored."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def record(event: FeedbackEvent, settings: Settings, *, idempotency_key: str | None = None) -> dict:
    """Check, store and act on one event; the answer says what it did (`purchase`, `replacement`).

    RequestError (nothing stored) for an unknown product, a product the named job did not show, or
    a purchase without a customer; FeedbackRejected for an unknown job (404), a job of another
    customer, a job not finished, a product already purchased from this job, or an idempotency key
    reused for a different event (409). A repeated idempotency key returns the first answer with
    `created: false`.
    """
    from recsys.recommend.request import check_idempotency_key

    check_idempotency_key(idempotency_key)
    fields = event.model_dump(mode="json")
    with get_engine(settings).begin() as conn:
        if idempotency_key is not None:
            earlier = _earlier_answer(conn, idempotency_key, fields)
            if earlier is not None:
                return earlier
        product = conn.execute(
            text("SELECT stock_code, description, price, is_non_product FROM products WHERE stock_code = :code"),
            {"code": event.stock_code},
        ).one_or_none()
        if product is None:
            raise RequestError(f"unknown stock_code {event.stock_code!r}")
        customer_id = event.customer_id
        job = None
        if event.job_id is not None:
            job = _job_for_update(conn, event.job_id)
            customer_id = _check_job(conn, job, event, customer_id)
        if event.event == "purchased" and customer_id is None:
            raise RequestError("a purchase needs a customer_id (in the event or in the job's request)")
        row = conn.execute(
            text(
                """
                INSERT INTO feedback_events (event, stock_code, customer_id, job_id, position, idempotency_key)
                VALUES (:event, :code, :customer, :job, :position, :key)
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING id, created_at
                """
            ),
            {"event": event.event, "code": event.stock_code, "customer": customer_id, "job": event.job_id,
             "position": event.position, "key": idempotency_key},
        ).one_or_none()
        if row is None:
            earlier = _earlier_answer(conn, idempotency_key, fields)
            if earlier is not None:
                return earlier
            raise RuntimeError(f"feedback with idempotency key {idempotency_key!r} vanished while recording")
        details: dict = {"purchase": None, "replacement": None}
        if event.event == "purchased":
            details["purchase"] = _record_purchase(conn, row.id, customer_id, product)
            if job is not None and job.kind == "discover":
                details["replacement"] = _replace_in_discover_result(conn, job, event.stock_code, row.id)
        answer = {
            "id": row.id,
            **fields,
            "customer_id": customer_id,
            "created_at": row.created_at.isoformat(),
            **details,
        }
        conn.execute(
            text("UPDATE feedback_events SET details = CAST(:details AS jsonb) WHERE id = :id"),
            {"details": json.dumps(answer), "id": row.id},
        )
    return {**answer, "created": True}


def _earlier_answer(conn: Connection, idempotency_key: str, fields: dict) -> dict | None:
    row = conn.execute(
        text("SELECT event, stock_code, job_id, position, customer_id, details FROM feedback_events "
             "WHERE idempotency_key = :key"),
        {"key": idempotency_key},
    ).one_or_none()
    if row is None:
        return None
    same = (row.event, row.stock_code, str(row.job_id) if row.job_id else None, row.position) == (
        fields["event"], fields["stock_code"], fields["job_id"], fields["position"]
    ) and fields["customer_id"] in (None, row.customer_id)
    if not same:
        raise FeedbackRejected(409, "idempotency_key_reused",
                               f"idempotency key {idempotency_key!r} was already used for a different event")
    return {**(row.details or {}), "created": False}


def _job_for_update(conn: Connection, job_id: uuid.UUID):
    """The job row, locked until the event is stored, so two reports on one result apply one after the other."""
    job = conn.execute(
        text("SELECT id, kind, status, request, result FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
    ).one_or_none()
    if job is None:
        raise FeedbackRejected(404, "job_not_found", f"no job {job_id}")
    return job


def _check_job(conn: Connection, job, event: FeedbackEvent, customer_id: int | None) -> int | None:
    """The customer the event is for; rejects events the job's result cannot have led to."""
    if job.status != "succeeded" or not job.result:
        raise FeedbackRejected(409, "job_not_finished", f"job {job.id} has no result to give feedback on")
    job_customer = (job.request or {}).get("customer_id")
    if job_customer is not None and customer_id is not None and job_customer != customer_id:
        raise FeedbackRejected(409, "customer_mismatch",
                               f"job {job.id} was for customer {job_customer}, not {customer_id}")
    shown, replaced = result_products(job.result)
    code = event.stock_code
    if code not in shown | replaced:
        raise RequestError(f"{code} is not among the products job {job.id} showed")
    if event.event == "purchased" and (code in replaced or _purchased_from(conn, job.id, code)):
        raise FeedbackRejected(409, "already_purchased", f"{code} was already reported purchased from job {job.id}")
    return customer_id if customer_id is not None else job_customer


def _purchased_from(conn: Connection, job_id: uuid.UUID, stock_code: str) -> bool:
    return conn.execute(
        text("SELECT EXISTS (SELECT 1 FROM feedback_events WHERE job_id = :job AND stock_code = :code "
             "AND event = 'purchased')"),
        {"job": job_id, "code": stock_code},
    ).scalar_one()


def result_products(result: dict) -> tuple[set[str], set[str]]:
    """(products a job's result shows now, products replaced after a purchase) for either kind of job."""
    if result.get("kind") == "discover":
        shown = {item["stock_code"] for group in result.get("groups", []) for item in group.get("items", [])}
        replaced = {entry["stock_code"] for group in result.get("groups", []) for entry in group.get("replaced", [])}
        return shown, replaced
    return {item["stock_code"] for item in result.get("items", [])}, set()


def _record_purchase(conn: Connection, event_id: int, customer_id: int, product) -> dict:
    """One purchase row marked as from feedback; a customer the shop did not know is created with it."""
    row = conn.execute(
        text(
            """
            WITH customer AS (
                INSERT INTO customers (customer_id, purchase_count, first_purchase_at, last_purchase_at)
                VALUES (:customer, 1, :now, :now)
                ON CONFLICT (customer_id) DO UPDATE
                    SET purchase_count = customers.purchase_count + 1,
                        first_purchase_at = coalesce(customers.first_purchase_at, excluded.first_purchase_at),
                        last_purchase_at = greatest(customers.last_purchase_at, excluded.last_purchase_at)
                RETURNING country
            )
            INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity, unit_price,
                                   invoiced_at, country, source)
            SELECT :hash, :invoice, :code, :customer, :description, 1, :price, :now, customer.country, 'feedback'
            FROM customer
            RETURNING id, invoice_no, invoiced_at
            """
        ),
        {
            "customer": customer_id,
            "now": _utc_now(conn),
            "hash": hashlib.sha256(f"feedback:{event_id}".encode()).digest(),
            "invoice": f"{FEEDBACK_INVOICE_PREFIX}{event_id}",
            "code": product.stock_code,
            "description": product.description,
            "price": product.price if product.price is not None else 0,
        },
    ).one()
    return {"id": row.id, "invoice_no": row.invoice_no, "invoiced_at": row.invoiced_at.isoformat(sep=" ")}


def _utc_now(conn: Connection):
    """The database's time as the naive UTC timestamp purchases store."""
    return conn.execute(text("SELECT CAST(now() AT TIME ZONE 'UTC' AS timestamp)")).scalar_one()


def _replace_in_discover_result(conn: Connection, job, stock_code: str, event_id: int) -> dict | None:
    """Swap the purchased product for its group's first extra, in place, and store the new result."""
    result = job.result
    for index, group in enumerate(result.get("groups", [])):
        items = group.get("items", [])
        position = next((i for i, item in enumerate(items) if item["stock_code"] == stock_code), None)
        if position is None:
            continue
        purchased = items[position]
        extras = group.get("extras", [])
        by = extras.pop(0) if extras else None
        if by is not None:
            items[position] = by
        else:
            items.pop(position)
        group.setdefault("replaced", []).append(
            {"stock_code": purchased["stock_code"], "description": purchased["description"],
             "replaced_by": by["stock_code"] if by else None, "feedback_event_id": event_id}
        )
        conn.execute(
            text("UPDATE jobs SET result = CAST(:result AS jsonb), updated_at = now() WHERE id = :id"),
            {"result": json.dumps(result), "id": job.id},
        )
        return {"group": index, "idea": group.get("idea"), "replaced": purchased, "by": by}
    return None


def shown_not_bought(customer_ids: Sequence[int], settings: Settings) -> dict[int, dict[str, int]]:
    """Per customer, the products shown to them (feedback `shown`) that they never bought, with how often shown.

    A negative signal for rankers: every customer asked for is a key (an empty dict when there is none).
    """
    signal: dict[int, dict[str, int]] = {customer_id: {} for customer_id in customer_ids}
    if not signal:
        return signal
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT f.customer_id, f.stock_code, count(*) AS shown
                FROM feedback_events f
                WHERE f.event = 'shown' AND f.customer_id = ANY(:customers)
                  AND NOT EXISTS (SELECT 1 FROM purchases p
                                  WHERE p.customer_id = f.customer_id AND p.stock_code = f.stock_code)
                GROUP BY f.customer_id, f.stock_code
                """
            ),
            {"customers": sorted(signal)},
        ).all()
    for row in rows:
        signal[row.customer_id][row.stock_code] = int(row.shown)
    return signal
