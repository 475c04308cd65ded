"""Reads from the catalog through the SQL functions in sql/: search, similar, a product, statistics.

Each search runs in its own transaction with `SET LOCAL hnsw.ef_search`, so ef_search can be
chosen per call (default `RECSYS_EF_SEARCH`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import Connection, text

from recsys.catalog.embedding import encode_query
from recsys.config import Settings
from recsys.platform.db import VectorArray, get_engine


@dataclass(frozen=True)
class SearchHit:
    stock_code: str
    description: str
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


def check_k(k: int, name: str = "k") -> None:
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
    k: int,
    settings: Settings,
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
    k: int,
    settings: Settings,
    ef_search: int | None = None,
    exclude_customers: Sequence[int | None] | None = None,
) -> list[list[SearchHit]]:
    """`search_by_vector` for many vectors in one statement: one index search per vector, one round trip.

    `exclude_customers[i]`, when given and not None, filters that customer's purchases from result i.
    """
    check_k(k)
    if len(query_embeddings) == 0:
        return []
    excludes = list(exclude_customers) if exclude_customers is not None else [None] * len(query_embeddings)
    if len(excludes) != len(query_embeddings):
        raise ValueError("exclude_customers must have one entry per query embedding")
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
            {"vectors": VectorArray(np.asarray(v, dtype=np.float32) for v in query_embeddings), "customers": excludes,
             "k": k},
        ).all()
    results: list[list[SearchHit]] = [[] for _ in query_embeddings]
    for r in rows:
        results[r.ord - 1].append(SearchHit(r.stock_code, r.description, float(r.score)))
    return results


def search(
    query: str,
    k: int,
    settings: Settings,
    ef_search: int | None = None,
    customer_id: int | None = None,
    exclude_purchased: bool = False,
    hybrid: bool = False,
) -> list[SearchHit]:
    """Products for a text query: vector search, or full-text + vector fused by reciprocal rank."""
    check_k(k)
    if exclude_purchased and customer_id is None:
        raise ValueError("excluding purchases needs a customer id")
    if hybrid and exclude_purchased:
        raise ValueError("hybrid search cannot exclude purchases; use vector search for that")
    vector = encode_query(query, settings)
    if not hybrid:
        return search_by_vector(vector, k, settings, ef_search, customer_id if exclude_purchased else None)
    with _search_transaction(settings, ef_search) as conn:
        rows = conn.execute(
            text("SELECT stock_code, description, score FROM hybrid_search(:text, :q, :k)"),
            {"text": query, "q": np.asarray(vector, dtype=np.float32), "k": k},
        ).all()
    return [SearchHit(r.stock_code, r.description, float(r.score)) for r in rows]


def similar(
    stock_code: str, k: int, settings: Settings, ef_search: int | None = None
) -> list[SearchHit]:
    """Products nearest to a product (SQL `similar_products`); an unknown code gives []."""
    check_k(k)
    with _search_transaction(settings, ef_search) as conn:
        rows = conn.execute(
            text("SELECT stock_code, description, distance FROM similar_products(:code, :k)"),
            {"code": stock_code, "k": k},
        ).all()
    return [SearchHit(r.stock_code, r.description, 1.0 - float(r.distance)) for r in rows]


def product(stock_code: str, settings: Settings) -> dict | None:
    """One product's catalog row (without its vector), or None."""
    with get_engine(settings).connect() as conn:
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


def stats(settings: Settings) -> dict:
    """Counts an operator wants at a glance."""
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
