"""Reads from the catalog: vector search, purchase history, statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import text

from recsys.config import Settings, get_settings
from recsys.db import get_engine
from recsys.embedding import encode_query, vector_literal

HISTORY_ORDERS = ("recent", "seed")


@dataclass(frozen=True)
class SearchHit:
    stock_code: str
    description: str
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HistoryEntry:
    stock_code: str
    description: str
    last_purchased_at: str
    quantity: int
    times_bought: int

    def as_dict(self) -> dict:
        return asdict(self)


def _check_k(k: int, name: str = "k") -> None:
    if k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k}")


def search_by_vector(
    query_embedding: Sequence[float], k: int = 10, settings: Settings | None = None, ef_search: int | None = None
) -> list[SearchHit]:
    """Nearest recommendable products by cosine similarity, through the HNSW index."""
    _check_k(k)
    settings = settings or get_settings()
    with get_engine(settings).begin() as conn:
        ef = str(ef_search or settings.ef_search)
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": ef})
        conn.execute(text("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"))
        rows = conn.execute(
            text(
                """
                SELECT stock_code, description, 1 - (embedding <=> CAST(:q AS vector)) AS score
                FROM products
                WHERE embedding IS NOT NULL AND NOT is_non_product
                ORDER BY embedding <=> CAST(:q AS vector)
                LIMIT :k
                """
            ),
            {"q": vector_literal(query_embedding), "k": k},
        ).all()
    return [SearchHit(r.stock_code, r.description, float(r.score)) for r in rows]


def search(query: str, k: int = 10, settings: Settings | None = None, ef_search: int | None = None) -> list[SearchHit]:
    """Products nearest to a text query."""
    _check_k(k)
    settings = settings or get_settings()
    return search_by_vector(encode_query(query, settings), k, settings, ef_search)


def history(
    customer_id: int, n: int = 10, order: str = "recent", settings: Settings | None = None
) -> list[HistoryEntry]:
    """A customer's distinct products: most recently bought first, or the notebook's order.

    `order="seed"` reproduces the notebook: distinct stock codes sorted as plain strings.
    """
    _check_k(n, "n")
    if order not in HISTORY_ORDERS:
        raise ValueError(f"order must be one of {', '.join(HISTORY_ORDERS)}, got {order!r}")
    order_by = "last_at DESC, stock_code" if order == "recent" else 'stock_code COLLATE "C"'
    with get_engine(settings or get_settings()).connect() as conn:
        rows = conn.execute(
            text(
                f"""
                SELECT h.stock_code, p.description, h.last_at, h.quantity, h.times_bought
                FROM (
                    SELECT stock_code, max(invoiced_at) AS last_at, sum(quantity) AS quantity,
                           count(DISTINCT invoice_no) AS times_bought
                    FROM purchases WHERE customer_id = :customer GROUP BY stock_code
                ) h JOIN products p USING (stock_code)
                ORDER BY {order_by}
                LIMIT :n
                """
            ),
            {"customer": customer_id, "n": n},
        ).all()
    return [
        HistoryEntry(r.stock_code, r.description, r.last_at.isoformat(sep=" "), int(r.quantity), int(r.times_bought))
        for r in rows
    ]


def stats(settings: Settings | None = None) -> dict:
    """Counts an operator wants at a glance."""
    settings = settings or get_settings()
    with get_engine(settings).connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT
                    (SELECT count(*) FROM purchases) AS purchases,
                    (SELECT count(*) FROM customers) AS customers,
                    (SELECT count(*) FROM products) AS products,
                    (SELECT count(*) FROM products WHERE is_non_product) AS non_products,
                    (SELECT count(*) FROM products WHERE embedding IS NOT NULL AND embedding_model = :model)
                        AS embedded_products,
                    (SELECT min(invoiced_at) FROM purchases) AS first_purchase_at,
                    (SELECT max(invoiced_at) FROM purchases) AS last_purchase_at,
                    (SELECT count(*) FROM ingest_runs WHERE status = 'succeeded') AS ingest_runs
                """
            ),
            {"model": settings.embedding_model},
        ).one()
    data = dict(row._mapping)
    for key in ("first_purchase_at", "last_purchase_at"):
        data[key] = data[key].isoformat(sep=" ") if data[key] else None
    data["embedding_model"] = settings.embedding_model
    return data
