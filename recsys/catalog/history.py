"""What customers bought: the one home of customer-history queries (recent products, history vectors).

Everything reads the SQL function `customer_history` (most recent first), so the API, the
pipeline, the CLI and SQL users see the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import func, select, text

from recsys.catalog.retrieval import check_k
from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.platform.models import Purchase

HISTORY_ORDERS = ("recent", "seed")
HISTORY_ITEMS = 10  # recent products a ranker sees and a history vector averages


@dataclass(frozen=True)
class HistoryEntry:
    stock_code: str
    description: str
    last_purchased_at: str
    quantity: int
    times_bought: int

    def as_dict(self) -> dict:
        return asdict(self)


def history(customer_id: int, n: int, order: str, settings: Settings) -> list[HistoryEntry]:
    """A customer's distinct products: most recently bought first (SQL `customer_history`), or the notebook's order.

    `order="seed"` reproduces the notebook: distinct stock codes sorted as plain strings.
    """
    check_k(n, "n")
    if order not in HISTORY_ORDERS:
        raise ValueError(f"order must be one of {', '.join(HISTORY_ORDERS)}, got {order!r}")
    if order == "recent":
        return recent_histories([customer_id], n, settings)[customer_id]
    query = """
        SELECT h.stock_code, p.description, h.last_purchased_at, h.quantity, h.times_bought
        FROM customer_history(:customer, 2147483647) h JOIN products p USING (stock_code)
        ORDER BY h.stock_code COLLATE "C"
        LIMIT :n
    """
    with get_engine(settings).connect() as conn:
        rows = conn.execute(text(query), {"customer": customer_id, "n": n}).all()
    return [_history_entry(r) for r in rows]


def _history_entry(r) -> HistoryEntry:
    return HistoryEntry(
        r.stock_code, r.description, r.last_purchased_at.isoformat(sep=" "), int(r.quantity), int(r.times_bought)
    )


def history_vector(customer_id: int, n: int, settings: Settings) -> np.ndarray | None:
    """Query vector for requests without text: the normalized mean of the customer's recent purchases."""
    return history_vectors([customer_id], n, settings).get(customer_id)


def history_vectors(
    customer_ids: Sequence[int], n: int, settings: Settings
) -> dict[int, np.ndarray]:
    """`history_vector` for many customers in one query; customers without embedded purchases are absent."""
    check_k(n, "n")
    if not customer_ids:
        return {}
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT c.customer_id, CAST(l2_normalize(avg(p.embedding)) AS real[]) AS mean
                FROM unnest(CAST(:customers AS bigint[])) AS c(customer_id)
                CROSS JOIN LATERAL customer_history(c.customer_id, :n) AS h
                JOIN products p ON p.stock_code = h.stock_code
                WHERE p.embedding IS NOT NULL AND NOT p.is_non_product
                GROUP BY c.customer_id
                """
            ),
            {"customers": sorted(set(customer_ids)), "n": n},
        ).all()
    return {r.customer_id: np.asarray(r.mean, dtype=np.float32) for r in rows if r.mean}


def recent_histories(
    customer_ids: Sequence[int], n: int, settings: Settings
) -> dict[int, list[HistoryEntry]]:
    """`history(customer, n, "recent")` for many customers in one query; every customer asked for is a key."""
    check_k(n, "n")
    histories: dict[int, list[HistoryEntry]] = {c: [] for c in customer_ids}
    if not histories:
        return histories
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT c.customer_id, h.*
                FROM unnest(CAST(:customers AS bigint[])) AS c(customer_id)
                CROSS JOIN LATERAL customer_history(c.customer_id, :n) AS h
                ORDER BY c.customer_id, h.last_purchased_at DESC, h.stock_code
                """
            ),
            {"customers": sorted(histories), "n": n},
        ).all()
    for r in rows:
        histories[r.customer_id].append(_history_entry(r))
    return histories


def history_page(customer_id: int, limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """One page of a customer's distinct products, most recent first, and how many there are."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(
            select(func.count(func.distinct(Purchase.stock_code))).where(Purchase.customer_id == customer_id)
        ).scalar_one()
        rows = conn.execute(
            text("SELECT * FROM customer_history(:customer, :n) OFFSET :offset"),
            {"customer": customer_id, "n": limit + offset, "offset": offset},
        ).all()
    return [dict(r._mapping) for r in rows], total
