"""Reads from the catalog through the SQL functions in sql/: search, similar, history, statistics.

Each search runs in its own transaction with `SET LOCAL hnsw.ef_search`, so ef_search can be
chosen per call (default `RECSYS_EF_SEARCH`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import Connection, text

from recsys.config import Settings, get_settings
from recsys.db import get_engine
from recsys.embedding import encode_query, vector_literal
from recsys.rankers.base import copurchase_totals, history_candidate_pairs

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


@contextmanager
def _search_transaction(settings: Settings, ef_search: int | None) -> Iterator[Connection]:
    """A transaction with this call's HNSW ef_search (SET LOCAL: it ends with the transaction)."""
    with get_engine(settings).begin() as conn:
        conn.execute(
            text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(ef_search or settings.ef_search)}
        )
        yield conn


def search_by_vector(
    query_embedding: Sequence[float],
    k: int = 10,
    settings: Settings | None = None,
    ef_search: int | None = None,
    exclude_customer: int | None = None,
) -> list[SearchHit]:
    """Nearest recommendable products by cosine similarity (SQL `search_products`).

    With `exclude_customer`, what that customer already bought is left out and k rows still
    come back (iterative index scan).
    """
    return search_many([query_embedding], k, settings, ef_search, [exclude_customer])[0]


def search_many(
    query_embeddings: Sequence[Sequence[float]],
    k: int = 10,
    settings: Settings | None = None,
    ef_search: int | None = None,
    exclude_customers: Sequence[int | None] | None = None,
) -> list[list[SearchHit]]:
    """`search_by_vector` for many vectors in one statement: one index search per vector, one round trip.

    `exclude_customers[i]`, when given and not None, filters that customer's purchases from result i.
    """
    _check_k(k)
    if len(query_embeddings) == 0:
        return []
    excludes = list(exclude_customers) if exclude_customers is not None else [None] * len(query_embeddings)
    if len(excludes) != len(query_embeddings):
        raise ValueError("exclude_customers must have one entry per query embedding")
    settings = settings or get_settings()
    with _search_transaction(settings, ef_search) as conn:
        rows = conn.execute(
            text(
                """
                SELECT q.ord, s.stock_code, s.description, s.score
                FROM unnest(CAST(:vectors AS vector[]), CAST(:customers AS bigint[]))
                     WITH ORDINALITY AS q(embedding, customer_id, ord)
                CROSS JOIN LATERAL search_products(q.embedding, :k, q.customer_id) AS s
                ORDER BY q.ord, s.distance, s.stock_code
                """
            ),
            {"vectors": [vector_literal(v) for v in query_embeddings], "customers": excludes, "k": k},
        ).all()
    results: list[list[SearchHit]] = [[] for _ in query_embeddings]
    for r in rows:
        results[r.ord - 1].append(SearchHit(r.stock_code, r.description, float(r.score)))
    return results


def search(
    query: str,
    k: int = 10,
    settings: Settings | None = None,
    ef_search: int | None = None,
    customer_id: int | None = None,
    exclude_purchased: bool = False,
    hybrid: bool = False,
) -> list[SearchHit]:
    """Products for a text query: vector search, or full-text + vector fused by reciprocal rank."""
    _check_k(k)
    settings = settings or get_settings()
    if exclude_purchased and customer_id is None:
        raise ValueError("excluding purchases needs a customer id")
    if hybrid and exclude_purchased:
        raise ValueError("hybrid search cannot exclude purchases; use vector search for that")
    vector = encode_query(query, settings)
    if not hybrid:
        return search_by_vector(vector, k, settings, ef_search, customer_id if exclude_purchased else None)
    with _search_transaction(settings, ef_search) as conn:
        rows = conn.execute(
            text("SELECT stock_code, description, score FROM hybrid_search(:text, CAST(:q AS vector), :k)"),
            {"text": query, "q": vector_literal(vector), "k": k},
        ).all()
    return [SearchHit(r.stock_code, r.description, float(r.score)) for r in rows]


def similar(
    stock_code: str, k: int = 10, settings: Settings | None = None, ef_search: int | None = None
) -> list[SearchHit]:
    """Products nearest to a product (SQL `similar_products`); an unknown code gives []."""
    _check_k(k)
    settings = settings or get_settings()
    with _search_transaction(settings, ef_search) as conn:
        rows = conn.execute(
            text("SELECT stock_code, description, distance FROM similar_products(:code, :k)"),
            {"code": stock_code, "k": k},
        ).all()
    return [SearchHit(r.stock_code, r.description, 1.0 - float(r.distance)) for r in rows]


def product(stock_code: str, settings: Settings | None = None) -> dict | None:
    """One product's catalog row (without its vector), or None."""
    with get_engine(settings or get_settings()).connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT stock_code, description, price, purchase_count, quantity_total, customer_count,
                       is_non_product, embedding IS NOT NULL AS embedded, embedding_model
                FROM products WHERE stock_code = :code
                """
            ),
            {"code": stock_code},
        ).one_or_none()
    if row is None:
        return None
    data = dict(row._mapping)
    data["price"] = float(data["price"]) if data["price"] is not None else None
    return data


def history(
    customer_id: int, n: int = 10, order: str = "recent", settings: Settings | None = None
) -> list[HistoryEntry]:
    """A customer's distinct products: most recently bought first (SQL `customer_history`), or the notebook's order.

    `order="seed"` reproduces the notebook: distinct stock codes sorted as plain strings.
    """
    _check_k(n, "n")
    if order not in HISTORY_ORDERS:
        raise ValueError(f"order must be one of {', '.join(HISTORY_ORDERS)}, got {order!r}")
    if order == "recent":
        query = "SELECT * FROM customer_history(:customer, :n)"
    else:
        query = """
            SELECT h.stock_code, p.description, h.last_purchased_at, h.quantity, h.times_bought
            FROM customer_history(:customer, 2147483647) h JOIN products p USING (stock_code)
            ORDER BY h.stock_code COLLATE "C"
            LIMIT :n
        """
    with get_engine(settings or get_settings()).connect() as conn:
        rows = conn.execute(text(query), {"customer": customer_id, "n": n}).all()
    return [_history_entry(r) for r in rows]


def _history_entry(r) -> HistoryEntry:
    return HistoryEntry(
        r.stock_code, r.description, r.last_purchased_at.isoformat(sep=" "), int(r.quantity), int(r.times_bought)
    )


def history_vector(customer_id: int, n: int = 10, settings: Settings | None = None) -> np.ndarray | None:
    """Query vector for requests without text: the normalized mean of the customer's recent purchases."""
    return history_vectors([customer_id], n, settings).get(customer_id)


def history_vectors(
    customer_ids: Sequence[int], n: int = 10, settings: Settings | None = None
) -> dict[int, np.ndarray]:
    """`history_vector` for many customers in one query; customers without embedded purchases are absent."""
    _check_k(n, "n")
    if not customer_ids:
        return {}
    with get_engine(settings or get_settings()).connect() as conn:
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
    customer_ids: Sequence[int], n: int = 10, settings: Settings | None = None
) -> dict[int, list[HistoryEntry]]:
    """`history(customer, n, "recent")` for many customers in one query; every customer asked for is a key."""
    _check_k(n, "n")
    histories: dict[int, list[HistoryEntry]] = {c: [] for c in customer_ids}
    if not histories:
        return histories
    with get_engine(settings or get_settings()).connect() as conn:
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


class DatabaseItemStats:
    """Popularity and co-purchase counts for the classical rankers, read from Postgres."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()

    def popularity(self, stock_codes: Sequence[str]) -> dict[str, float]:
        with get_engine(self.settings).connect() as conn:
            rows = conn.execute(
                text("SELECT stock_code, customer_count FROM products WHERE stock_code = ANY(:codes)"),
                {"codes": list(stock_codes)},
            ).all()
        return {r.stock_code: float(r.customer_count) for r in rows}

    def copurchase(self, history_codes: Sequence[str], candidate_codes: Sequence[str]) -> dict[str, float]:
        pairs = self.copurchase_pairs(history_candidate_pairs(history_codes, candidate_codes))
        return copurchase_totals(pairs, history_codes, candidate_codes)

    def copurchase_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Invoices together for exactly these pairs, one index probe each, in one statement."""
        if not pairs:
            return {}
        with get_engine(self.settings).connect() as conn:
            rows = conn.execute(
                text(
                    """
                    SELECT c.stock_code, c.other_stock_code, c.invoices
                    FROM unnest(CAST(:first AS text[]), CAST(:second AS text[])) AS p(stock_code, other_stock_code)
                    JOIN copurchase c USING (stock_code, other_stock_code)
                    """
                ),
                {"first": [a for a, _ in pairs], "second": [b for _, b in pairs]},
            ).all()
        return {(r.stock_code, r.other_stock_code): float(r.invoices) for r in rows}


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
