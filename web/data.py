"""Small reads and one write the pages and the API need that the core has no use for.

Listing pages (customers, products, a long history) and storing feedback events; everything
else goes through recsys.retrieval and recsys.jobs.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, insert, select, text

from recsys.config import Settings
from recsys.db import get_engine
from recsys.models import Customer, FeedbackEvent, Product, Purchase


def customer(customer_id: int, settings: Settings) -> dict | None:
    with get_engine(settings).connect() as conn:
        row = conn.execute(select(Customer).where(Customer.customer_id == customer_id)).one_or_none()
    return dict(row._mapping) if row else None


def product_exists(stock_code: str, settings: Settings) -> bool:
    with get_engine(settings).connect() as conn:
        return conn.execute(select(Product.stock_code).where(Product.stock_code == stock_code)).first() is not None


def list_customers(limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """Customers with the most purchase lines first, and how many there are."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
        rows = conn.execute(
            select(Customer)
            .order_by(Customer.purchase_count.desc(), Customer.customer_id)
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def list_products(limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """Recommendable products bought by the most customers first, and how many there are."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(select(func.count()).select_from(Product).where(~Product.is_non_product)).scalar_one()
        rows = conn.execute(
            select(Product.stock_code, Product.description, Product.price, Product.customer_count,
                   Product.purchase_count, Product.embedding.is_not(None).label("embedded"))
            .where(~Product.is_non_product)
            .order_by(Product.customer_count.desc(), Product.stock_code)
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def history_page(customer_id: int, limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """One page of a customer's distinct products, most recent first (SQL `customer_history`)."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(
            select(func.count(func.distinct(Purchase.stock_code))).where(Purchase.customer_id == customer_id)
        ).scalar_one()
        rows = conn.execute(
            text("SELECT * FROM customer_history(:customer, :n) OFFSET :offset"),
            {"customer": customer_id, "n": limit + offset, "offset": offset},
        ).all()
    return [dict(r._mapping) for r in rows], total


def add_feedback(event: str, stock_code: str, customer_id: int | None, job_id: uuid.UUID | None,
                 position: int | None, settings: Settings) -> dict:
    with get_engine(settings).begin() as conn:
        row = conn.execute(
            insert(FeedbackEvent)
            .values(event=event, stock_code=stock_code, customer_id=customer_id, job_id=job_id, position=position)
            .returning(FeedbackEvent.id, FeedbackEvent.created_at)
        ).one()
    return {"id": row.id, "event": event, "stock_code": stock_code, "customer_id": customer_id,
            "job_id": str(job_id) if job_id else None, "position": position, "created_at": row.created_at.isoformat()}
