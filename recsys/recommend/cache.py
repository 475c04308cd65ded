"""The result cache: answers keyed by everything that changes them.

The key hashes the request (query, k, ranker, explain, exclude_purchased), the customer's
history fingerprint (count and newest id of their purchases), the ranker's model and prompt
version, the embedding model, the catalog version (latest succeeded ingest run and the
`catalog_version` counter that moves whenever products or their embeddings change) and the
settings that shape the candidates. A new purchase, ingest, re-embedding or model change
therefore misses the cache instead of serving a stale answer.

Hits are counted in the process and written (per entry and per minute) about once a second by a
background thread, not by the request that hit: a hit is then one read and no write, and busy
entries are not a row lock every request queues on. A crash loses at most that second's counts.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from typing import NamedTuple

from sqlalchemy import Connection, text

from recsys.catalog.embedding import query_dtype
from recsys.config import Settings
from recsys.platform.db import database_key, get_engine
from recsys.recommend.candidates import candidate_settings
from recsys.recommend.pipeline import model_identity
from recsys.recommend.request import RecommendationRequest, RequestError

log = logging.getLogger(__name__)

# 2: candidates from four sources; 3: the catalog version is a counter (migration 0010);
# 4: the fingerprints are hashed in SQL after the settled parts (`KEYED_CTES`), so one statement keys and looks up
KEY_VERSION = 4
# Hits per minute are counted in the broker (one key per minute, kept a day) for the dashboard's chart;
# the cache table only knows each entry's total.
HITS_KEY_PREFIX = "recsys:cache_hits:"
HITS_KEPT_SECONDS = 26 * 3600
HITS_FLUSH_SECONDS = 1.0


class CachedAnswer(NamedTuple):
    result_json: str
    """The stored result as JSON text, passed on without being parsed (it is most of a cached answer)."""
    job_id: object
    """The job that computed the answer: an id every answer can be looked up by."""


# Statements in the driver's parameter style: the API's hot path sends them on the psycopg connection itself
# (`recsys.platform.db.run_bare`), SQLAlchemy callers through `exec_driver_sql`.
FINGERPRINTS_SQL = """
    SELECT h.purchases, h.newest_purchase,
           (SELECT version FROM catalog_version) AS catalog_version,
           (SELECT max(id) FROM ingest_runs WHERE status = 'succeeded') AS ingest_run
    FROM (SELECT count(*) AS purchases, max(id) AS newest_purchase
          FROM purchases WHERE customer_id = %(c)s) AS h
"""

# The key is sha256("<settled>|<purchases>,<newest purchase>|<ingest run>|<catalog version>") (`key_text`),
# where settled hashes the parts known before the database is asked; no customer, no purchase part.
# Parameters: `key_parameters`. recsys.jobs.submit builds on these two CTEs to queue a job in the same statement.
KEYED_CTES = f"""
    prints AS ({FINGERPRINTS_SQL}), keyed AS (
        SELECT purchases, encode(sha256(convert_to(concat_ws('|', CAST(%(settled)s AS text),
                   CASE WHEN CAST(%(c)s AS bigint) IS NULL THEN '' ELSE concat(purchases, ',', newest_purchase) END,
                   coalesce(CAST(ingest_run AS text), ''), coalesce(CAST(catalog_version AS text), '')),
               'UTF8')), 'hex') AS cache_key
        FROM prints
    )
"""
KEY_SQL = f"WITH {KEYED_CTES} SELECT purchases, cache_key FROM keyed"


def fingerprints(conn: Connection, customer_id: int | None) -> dict:
    """The customer's history fingerprint and the catalog version, in one round trip.

    count and max(id) share one aggregate so the planner uses the customer index (a lone
    max(id) walks the primary key backwards: 20 ms instead of 1). The catalog version is one
    row that a trigger moves on whenever products or their embeddings change (migration 0010),
    so reading it costs the same for 3,000 products or a million.
    """
    row = conn.exec_driver_sql(FINGERPRINTS_SQL, {"c": customer_id}).one()
    return {
        "customer": [row.purchases, row.newest_purchase] if customer_id is not None else [],
        "catalog": [row.ingest_run, row.catalog_version],
    }


def settled_digest(request: RecommendationRequest, settings: Settings) -> str:
    """SHA-256 over every part of the key that is known without the database; `request` has its defaults."""
    model, prompt_version = model_identity(request.ranker, settings)
    parts = {
        "v": KEY_VERSION,
        "request": request.as_dict(),
        "model": model,
        "prompt_version": prompt_version,
        "embedding_model": settings.embedding_model,
        "query_dtype": query_dtype(settings),
        **candidate_settings(settings),
        "max_candidates": settings.max_candidates,
        "verbalizer_permutations": settings.verbalizer_permutations if model else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def key_text(settled: str, prints: dict) -> str:
    """What KEYED_CTES hashes into the key, from `fingerprints`' answer (for readers and tests)."""
    customer = ",".join("" if part is None else str(part) for part in prints["customer"])
    catalog = ["" if part is None else str(part) for part in prints["catalog"]]
    return "|".join([settled, customer, *catalog])


def key_parameters(request: RecommendationRequest, settings: Settings) -> dict:
    """The parameters of KEYED_CTES for this request (defaults filled in)."""
    return {"settled": settled_digest(request, settings), "c": request.customer_id}


def needs_purchases(request: RecommendationRequest) -> bool:
    """A customer and no query text: only the customer's purchases can say what to recommend."""
    return request.customer_id is not None and not request.query


def check_servable(request: RecommendationRequest, purchases: int) -> None:
    """Refuse, before any job exists, a request that cannot be served (RequestError)."""
    if needs_purchases(request) and not purchases:
        raise RequestError(f"customer {request.customer_id} has no purchases and the request has no query text")


def cache_key(conn: Connection, request: RecommendationRequest, settings: Settings) -> str:
    """SHA-256 over everything that changes the answer; `request` must have its defaults filled in.

    Reading the customer's history fingerprint also refuses, before any job exists, a request that
    cannot be served: no query text and a customer without purchases (RequestError).
    """
    purchases, key = conn.exec_driver_sql(KEY_SQL, key_parameters(request, settings)).one()
    check_servable(request, purchases)
    return key


def lookup(conn: Connection, key: str) -> CachedAnswer | None:
    """The cached result and the job that made it; None on a miss. A hit is not counted here: call `record_hit`."""
    row = conn.execute(
        text("SELECT CAST(result AS text) AS result, job_id FROM result_cache WHERE cache_key = :key"), {"key": key}
    ).one_or_none()
    return CachedAnswer(row.result, row.job_id) if row is not None else None


class _PendingHits:
    """Hits counted in this process and not yet written, for one database and broker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.per_entry: Counter[str] = Counter()
        self.last_hit: dict[str, float] = {}
        self.per_minute: Counter[int] = Counter()

    def add(self, key: str, now: float) -> None:
        self.per_entry[key] += 1
        self.last_hit[key] = now
        self.per_minute[int(now // 60)] += 1


_pending: dict[tuple[str, str], _PendingHits] = {}
_pending_lock = threading.Lock()
_flush_lock = threading.Lock()
_flush_wanted = threading.Event()
_flusher: threading.Thread | None = None


def record_hit(settings: Settings, key: str) -> None:
    """Count one hit of the entry `key`: written within HITS_FLUSH_SECONDS by this process's flusher thread."""
    global _flusher
    now = time.time()
    with _pending_lock:
        ident = (database_key(settings), settings.celery_broker_url)
        pending = _pending.get(ident)
        if pending is None:
            pending = _pending[ident] = _PendingHits(settings)
        pending.add(key, now)
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_forever, name="recsys-cache-hits", daemon=True)
            _flusher.start()
    if not _flush_wanted.is_set():  # set() takes a lock and wakes waiters: once per flush is enough
        _flush_wanted.set()


def _flush_forever() -> None:
    while True:
        _flush_wanted.wait()
        time.sleep(HITS_FLUSH_SECONDS)
        _flush_wanted.clear()
        flush_hits()


def flush_hits() -> None:
    """Write the hits this process has counted: entry totals to the database, per-minute counts to the broker.

    Readers of either call it first, so a process sees its own hits at once. A database or broker that is
    down costs the counts, nothing more (logged).
    """
    with _flush_lock:
        with _pending_lock:
            batches = list(_pending.values())
            _pending.clear()
        for pending in batches:
            _write_entry_hits(pending)
            _write_minute_hits(pending)


def _write_entry_hits(pending: _PendingHits) -> None:
    keys = sorted(pending.per_entry)  # one lock order for every writer: concurrent flushes cannot deadlock
    try:
        with get_engine(pending.settings).begin() as conn:
            conn.execute(text("SET LOCAL synchronous_commit = off"))  # counts, not jobs: no WAL flush wait
            conn.execute(
                text(
                    """
                    UPDATE result_cache c SET hits = c.hits + v.n, last_hit_at = greatest(c.last_hit_at, v.at)
                    FROM (SELECT unnest(CAST(:keys AS text[])) AS cache_key, unnest(CAST(:counts AS int[])) AS n,
                                 to_timestamp(unnest(CAST(:ats AS float8[]))) AS at) AS v
                    WHERE c.cache_key = v.cache_key
                    """
                ),
                {"keys": keys, "counts": [pending.per_entry[k] for k in keys],
                 "ats": [pending.last_hit[k] for k in keys]},
            )
    except Exception as exc:
        log.warning("%d cache hits not counted in the database: %s", sum(pending.per_entry.values()), exc)


def _write_minute_hits(pending: _PendingHits) -> None:
    from recsys.platform import broker

    try:
        pipe = broker.redis_client(pending.settings).pipeline(transaction=False)
        for minute, count in sorted(pending.per_minute.items()):
            key = f"{HITS_KEY_PREFIX}{minute}"
            pipe.incrby(key, count).expire(key, HITS_KEPT_SECONDS)
        pipe.execute()
    except Exception as exc:
        log.debug("cache hits not counted per minute: %s", exc)


def _forget_inherited_hits() -> None:
    """A forked child starts with no pending hits (its parent writes its own) and no flusher thread."""
    global _flusher, _pending_lock, _flush_lock, _flush_wanted
    _pending.clear()
    _flusher = None
    _pending_lock, _flush_lock, _flush_wanted = threading.Lock(), threading.Lock(), threading.Event()


os.register_at_fork(after_in_child=_forget_inherited_hits)
atexit.register(flush_hits)


def hits_per_minute(settings: Settings, first_minute: int, last_minute: int) -> dict[int, int]:
    """Hits counted in each minute (epoch minutes, both ends included); empty when the broker cannot say."""
    from recsys.platform import broker

    minutes = list(range(first_minute, last_minute + 1))
    if not minutes:
        return {}
    flush_hits()
    try:
        counts = broker.redis_client(settings).mget([f"{HITS_KEY_PREFIX}{m}" for m in minutes])
    except Exception as exc:
        log.warning("cache hit counts unavailable: %s", exc)
        return {}
    return {minute: int(count) for minute, count in zip(minutes, counts, strict=True) if count}


def stats(conn: Connection) -> dict:
    """Entries and hits; the caller flushes this process's pending hits first (`flush_hits`)."""
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
