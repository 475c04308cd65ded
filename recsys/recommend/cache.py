"""The result cache: answers keyed by everything that changes them.

The key hashes the request (query, k, ranker, explain, exclude_purchased), the customer's
history fingerprint (count and newest id of their purchases), the ranker's model and prompt
version, the embedding model, the catalog version (latest succeeded ingest run, count and
newest time of product embeddings) and the settings that shape the candidates. A new purchase,
ingest, re-embedding or model change therefore misses the cache instead of serving a stale answer.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import Connection, text

from recsys.catalog.embedding import query_dtype
from recsys.config import Settings
from recsys.recommend.pipeline import model_identity
from recsys.recommend.request import RecommendationRequest

KEY_VERSION = 1


def fingerprints(conn: Connection, customer_id: int | None) -> dict:
    """The customer's history fingerprint and the catalog version, in one round trip.

    count and max(id) share one aggregate so the planner uses the customer index (a lone
    max(id) walks the primary key backwards: 20 ms instead of 1).
    """
    row = conn.execute(
        text(
            """
            SELECT h.purchases, h.newest_purchase, c.embedded, c.embedded_at,
                   (SELECT max(id) FROM ingest_runs WHERE status = 'succeeded') AS ingest_run
            FROM (SELECT count(*) AS purchases, max(id) AS newest_purchase
                  FROM purchases WHERE customer_id = :c) AS h,
                 (SELECT count(embedded_at) AS embedded, max(embedded_at) AS embedded_at FROM products) AS c
            """
        ),
        {"c": customer_id},
    ).one()
    return {
        "customer": [row.purchases, row.newest_purchase] if customer_id is not None else [],
        "catalog": [row.ingest_run, row.embedded, row.embedded_at.isoformat() if row.embedded_at else None],
    }


def cache_key(conn: Connection, request: RecommendationRequest, settings: Settings) -> str:
    """SHA-256 over everything that changes the answer; `request` must have its defaults filled in."""
    model, prompt_version = model_identity(request.ranker, settings)
    parts = {
        "v": KEY_VERSION,
        "request": request.as_dict(),
        **fingerprints(conn, request.customer_id),
        "model": model,
        "prompt_version": prompt_version,
        "embedding_model": settings.embedding_model,
        "query_dtype": query_dtype(settings),
        "retrieve_k": settings.retrieve_k,
        "ef_search": settings.ef_search,
        "max_candidates": settings.max_candidates,
        "verbalizer_permutations": settings.verbalizer_permutations if model else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def lookup(conn: Connection, key: str) -> dict | None:
    """The cached result, counting the hit; None on a miss."""
    return conn.execute(
        text(
            "UPDATE result_cache SET hits = hits + 1, last_hit_at = now() WHERE cache_key = :key RETURNING result"
        ),
        {"key": key},
    ).scalar_one_or_none()


def stats(conn: Connection) -> dict:
    row = conn.execute(
        text(
            "SELECT count(*) AS entries, coalesce(sum(hits), 0) AS hits, max(last_hit_at) AS last_hit "
            "FROM result_cache"
        )
    ).one()
    last_hit = row.last_hit.isoformat() if row.last_hit else None
    return {"entries": row.entries, "hits": int(row.hits), "last_hit_at": last_hit}


def clear(conn: Connection) -> int:
    return conn.execute(text("DELETE FROM result_cache")).rowcount
