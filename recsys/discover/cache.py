"""The result-cache key of a discover request: everything that changes its answer.

The need, the customer's history fingerprint and the catalog version (shared with
recommendations), the LLM and the discover prompt version, the embedding model and query
precision, and the search settings. A purchase (from ingest or from feedback) changes the
fingerprint, so the next request for that customer misses the cache.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import Connection

from recsys.catalog.embedding import query_dtype
from recsys.config import Settings
from recsys.discover.pipeline import KIND, POOL_PER_IDEA, SHOWN_PER_GROUP
from recsys.discover.prompt import DISCOVER_PROMPT_VERSION
from recsys.discover.request import DiscoverRequest
from recsys.recommend.cache import fingerprints

KEY_VERSION = 1


def cache_key(conn: Connection, request: DiscoverRequest, settings: Settings) -> str:
    parts = {
        "v": KEY_VERSION,
        "kind": KIND,
        "request": request.as_dict(),
        **fingerprints(conn, request.customer_id),
        "model": settings.llm_model,
        "prompt_version": DISCOVER_PROMPT_VERSION,
        "embedding_model": settings.embedding_model,
        "query_dtype": query_dtype(settings),
        "ef_search": settings.ef_search,
        "pool": [POOL_PER_IDEA, SHOWN_PER_GROUP],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
