"""The result cache: answers keyed by everything that changes them.

The key hashes the request (query, k, ranker, explain, exclude_purchased), the customer's
history fingerprint (count and newest id of their purchases), the ranker's model and prompt
version, the embedding model, the catalog version (latest succeeded ingest run and the
`catalog_version` counter that moves whenever products or their embeddings change) and the
settings that shape the candidates. A new purchase, ingest, re-embedding or model change
therefore misses the cache instead of serving a stale answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import NamedTuple

from sqlalchemy import Connection, text

from recsys.catalog.embedding import query_dtype
from recsys.config import Settings
from recsys.recommend.candidates import candidate_settings
from recsys.recommend.pipeline import model_identity
from recsys.recommend.request import RecommendationRequest, RequestError

log = logging.getLogger(__name__)

KEY_VERSION = 3  # 2: candidates from four sources; 3: the catalog version is a counter (migration 0010)
# Hits per minute are counted in the broker (one key per minute, kept a day) for the dashboard's chart;
# the cache table only knows each entry's total.
HITS_KEY_PREFIX = "recsys:cache_hits:"
HITS_KEPT_SECONDS = 26 * 3600


class CachedAnswer(NamedTuple):
    result: dict
    job_id: object
    """The job that computed the answer: an id every answer can be looked up by."""


def fingerprints(conn: Connection, customer_id: int | None) -> dict:
    """The customer's history fingerprint and the catalog version, in one round trip.

    count and max(id) share one aggregate so the planner uses the customer index (a lone
    max(id) walks the primary key backwards: 20 ms instead of 1). The catalog version is one
    row that a trigger moves on whenever products or their embeddings change (migration 0010),
    so reading it costs the same for 3,000 products or a million.
    """
    row = conn.execute(
        text(
            """
            SELECT h.purchases, h.newest_purchase,
                   (SELECT version FROM catalog_version) AS catalog_version,
                   (SELECT max(id) FROM ingest_runs WHERE status = 'succeeded') AS ingest_run
            FROM (SELECT count(*) AS purchases, max(id) AS newest_purchase
                  FROM purchases WHERE customer_id = :c) AS h
            """
        ),
        {"c": customer_id},
    ).one()
    return {
        "customer": [row.purchases, row.newest_purchase] if customer_id is not None else [],
        "catalog": [row.ingest_run, row.catalog_version],
    }


def cache_key(conn: Connection, request: RecommendationRequest, settings: Settings) -> str:
    """SHA-256 over everything that changes the answer; `request` must have its defaults filled in.

    Reading the customer's history fingerprint also refuses, before any job exists, a request that
    cannot be served: no query text and a customer without purchases (RequestError).
    """
    model, prompt_version = model_identity(request.ranker, settings)
    prints = fingerprints(conn, request.customer_id)
    if request.customer_id is not None and not request.query and not prints["customer"][0]:
        raise RequestError(f"customer {request.customer_id} has no purchases and the request has no query text")
    parts = {
        "v": KEY_VERSION,
        "request": request.as_dict(),
        **prints,
        "model": model,
        "prompt_version": prompt_version,
        "embedding_model": settings.embedding_model,
        "query_dtype": query_dtype(settings),
        **candidate_settings(settings),
        "max_candidates": settings.max_candidates,
        "verbalizer_permutations": settings.verbalizer_permutations if model else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def lookup(conn: Connection, key: str) -> CachedAnswer | None:
    """The cached result and the job that made it, counting the hit; None on a miss."""
    row = conn.execute(
        text(
            "UPDATE result_cache SET hits = hits + 1, last_hit_at = now() WHERE cache_key = :key "
            "RETURNING result, job_id"
        ),
        {"key": key},
    ).one_or_none()
    return CachedAnswer(row.result, row.job_id) if row is not None else None


def record_hit(settings: Settings) -> None:
    """Count one hit in this minute's broker counter; a broker that is down costs the chart a point, nothing more."""
    from recsys.platform import broker

    key = f"{HITS_KEY_PREFIX}{int(time.time() // 60)}"
    try:
        broker.redis_client(settings).pipeline(transaction=False).incr(key).expire(key, HITS_KEPT_SECONDS).execute()
    except Exception as exc:
        log.debug("cache hit not counted: %s", exc)


def hits_per_minute(settings: Settings, first_minute: int, last_minute: int) -> dict[int, int]:
    """Hits counted in each minute (epoch minutes, both ends included); empty when the broker cannot say."""
    from recsys.platform import broker

    minutes = list(range(first_minute, last_minute + 1))
    if not minutes:
        return {}
    try:
        counts = broker.redis_client(settings).mget([f"{HITS_KEY_PREFIX}{m}" for m in minutes])
    except Exception as exc:
        log.warning("cache hit counts unavailable: %s", exc)
        return {}
    return {minute: int(count) for minute, count in zip(minutes, counts, strict=True) if count}


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
