"""Stage 1 of the pipeline: candidates from four sources, merged, each tagged with its sources and evidence.

- **vector**: nearest products to the search vector (the query text's embedding, or the mean
  embedding of the customer's 10 most recent purchases when there is no query);
- **repeat**: the customer's own purchases by recency-weighted frequency (each invoice weighs
  0.5 ** (age in days / `REPEAT_HALF_LIFE_DAYS`));
- **copurchase**: products bought in the same invoices as the customer's 10 most recent purchases
  (the `copurchase` view), by invoices shared, summed over those purchases; each purchase
  contributes its `NEIGHBOURS` strongest partners;
- **popular**: products bought by the most customers in the `POPULAR_DAYS` days up to the
  reference time.

With query text the repeat, co-purchase and popular sources keep only products among the query's
`RECSYS_QUERY_POOL` nearest (a customer searching "BAG CHARM" gets bag charms, theirs first).
`exclude_purchased` drops the repeat source and filters what the customer bought from the others.
A customer without purchases gets vector search and the popular source (a cold start).

Each source contributes at most its quota (`RECSYS_*_CANDIDATES`); the lists are merged by
weighted reciprocal-rank fusion (`FUSION_WEIGHTS`, constant `FUSION_K`) and cut to the caller's
limit. The weights and quotas come from the evaluation (README, Evaluation).

Cost: one SQL statement for the whole batch does the vector search, the repeat source and the
evidence of every merged candidate. The recent best sellers and each product's strongest
co-purchase partners are read once per process (again after purchases are added, or after an
ingest refreshed the `copurchase` view) and applied in Python. "Reference time" is `as_of` when
given, else the newest purchase in the database. `as_of` bounds every read of purchases to before
it (for training on the past); the `copurchase` view cannot be bounded so and holds what it held at
its last refresh: for candidates that know nothing after a cutoff, point the settings at a snapshot
database (`recsys.evaluation.snapshot`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np
from sqlalchemy import text

from recsys.catalog.history import HISTORY_ITEMS
from recsys.config import Settings
from recsys.platform.db import VectorArray, fetch_binary, get_engine
from recsys.platform.process import process_thread
from recsys.rankers.base import CANDIDATE_SOURCES, Candidate

log = logging.getLogger(__name__)

SOURCES = CANDIDATE_SOURCES
REPEAT_HALF_LIFE_DAYS = 180.0
POPULAR_DAYS = 30
NEIGHBOURS = 50
FUSION_K = 10
# Weight of each source in the fusion, with and without query text (chosen on the evaluation's cases).
FUSION_WEIGHTS = {
    True: {"vector": 2.0, "repeat": 1.0, "copurchase": 0.5, "popular": 1.0},
    False: {"vector": 0.5, "repeat": 2.0, "copurchase": 1.0, "popular": 0.5},
}
POPULAR_REFRESH_SECONDS = 30.0
NOT_FOUND = 10**9
# columns of a row of the batch statement
(ORD, CODE, DESCRIPTION, NEAREST, MATCHES, REPEAT_RANK, QUERY_SIM, HISTORY_SIM, REPEAT_SCORE, TIMES, DAYS) = range(11)


@dataclass(frozen=True)
class CandidateRequest:
    """What the candidate stage needs of one request: `query_vector` is the query text's embedding
    (searching by it), `query` the text itself (full-text matching of the query's pool)."""

    customer_id: int | None
    query_vector: np.ndarray | None = None
    exclude_purchased: bool = False
    query: str | None = None


@dataclass
class CandidateSet:
    """One request's merged candidates, best first, and what the stage knew about the request."""

    candidates: list[Candidate]
    cold_start: bool
    searched_by: str | None  # "query", "history" (mean of recent purchases) or None (no search vector)
    found: dict[str, int] = field(default_factory=dict)  # merged candidates each source found


def quotas(settings: Settings) -> dict[str, int]:
    return {
        "vector": settings.vector_candidates,
        "repeat": settings.repeat_candidates,
        "copurchase": settings.copurchase_candidates,
        "popular": settings.popular_candidates,
    }


def candidate_settings(settings: Settings) -> dict:
    """Everything in the settings that changes the candidates (for the result cache key)."""
    return {"retrieve_k": settings.retrieve_k, "ef_search": settings.ef_search, "query_pool": settings.query_pool,
            **{f"{source}_candidates": n for source, n in quotas(settings).items()}}


# ---------------------------------------------------------------- statistics read once per process


@dataclass(frozen=True)
class BestSellers:
    marker: tuple
    read_at: float
    codes: tuple[str, ...]  # best first
    customers: Mapping[str, int]  # customers in the last POPULAR_DAYS days
    all_time: Mapping[str, int]  # customers ever (before as_of)
    non_products: frozenset[str]  # codes never recommended (postage, fees)
    reference: datetime  # as_of, or the newest purchase: what "days since" and "the last 30 days" count from

    @cached_property
    def position(self) -> dict[str, int]:
        return {code: i for i, code in enumerate(self.codes)}


class Neighbours:
    """Products' `NEIGHBOURS` strongest co-purchase partners, read as batches first need them.

    Codes get small integer ids (`index`) so a customer's partners add up with numpy.
    """

    def __init__(self, marker: tuple) -> None:
        self.marker = marker
        self.checked_at = 0.0
        self.codes: list[str] = []
        self.index: dict[str, int] = {}
        self.partners: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # code -> (partner ids, invoices)
        self.lock = threading.Lock()

    def code_order(self) -> np.ndarray:
        """Each id's place in stock-code order (for ties), recomputed when new codes were read."""
        cached = getattr(self, "_order", None)
        if cached is None or len(cached) != len(self.codes):
            cached = np.empty(len(self.codes), dtype=np.int64)
            cached[np.argsort(np.asarray(self.codes, dtype=object))] = np.arange(len(self.codes))
            self._order = cached
        return cached

    def _id(self, code: str) -> int:
        found = self.index.get(code)
        if found is None:
            found = self.index[code] = len(self.codes)
            self.codes.append(code)
        return found

    def read(self, conn, codes: Sequence[str]) -> None:
        """Read the partners of the codes not read yet (one statement)."""
        missing = sorted(set(codes) - self.partners.keys())
        if not missing:
            return
        rows = conn.execute(_NEIGHBOURS, {"codes": missing, "neighbours": NEIGHBOURS}).all()
        with self.lock:
            grouped: dict[str, tuple[list[int], list[float]]] = {code: ([], []) for code in missing}
            for r in rows:
                partners, counts = grouped[r.stock_code]
                partners.append(self._id(r.other_stock_code))
                counts.append(float(r.invoices))
            for code, (partners, counts) in grouped.items():
                self.partners[code] = (np.asarray(partners, dtype=np.int64), np.asarray(counts, dtype=np.float64))


_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()

_PURCHASES_MARKER = text("SELECT max(id) AS newest FROM purchases")
_COPURCHASE_MARKER = text(
    "SELECT max(id) AS run, max(finished_at) AS finished FROM ingest_runs WHERE status = 'succeeded'"
)
_REFERENCE = text(
    "SELECT coalesce(CAST(:as_of AS timestamp), max(last_purchase_at), localtimestamp) FROM customers"
)
_BEST_SELLERS = text(
    f"""
    WITH ref AS (
        SELECT coalesce(CAST(:as_of AS timestamp), max(last_purchase_at), localtimestamp) AS at FROM customers
    )
    SELECT pu.stock_code,
           count(DISTINCT pu.customer_id) FILTER (
               WHERE pu.invoiced_at >= ref.at - interval '{POPULAR_DAYS} days') AS recent,
           count(DISTINCT pu.customer_id) AS ever
    FROM purchases pu JOIN products p USING (stock_code) CROSS JOIN ref
    WHERE NOT p.is_non_product
      AND (CAST(:as_of AS timestamp) IS NULL OR pu.invoiced_at < CAST(:as_of AS timestamp))
    GROUP BY pu.stock_code
    """
)
_NEIGHBOURS = text(
    """
    SELECT q.stock_code, n.other_stock_code, n.invoices
    FROM unnest(CAST(:codes AS text[])) AS q(stock_code)
    CROSS JOIN LATERAL (
        SELECT c.other_stock_code, c.invoices FROM copurchase c
        WHERE c.stock_code = q.stock_code
        ORDER BY c.invoices DESC, c.other_stock_code
        LIMIT :neighbours
    ) n
    """
)


def best_sellers(settings: Settings, as_of: datetime | None = None) -> BestSellers:
    """Customers per product in the last `POPULAR_DAYS` days (and ever), best first.

    Read again only when purchases were added and the list is older than
    `POPULAR_REFRESH_SECONDS` (a few new purchases do not move 30 days of sales).
    """
    engine = get_engine(settings)
    key = ("best sellers", str(engine.url), as_of)
    cached = _cache.get(key)
    if cached is not None and time.monotonic() - cached.read_at < POPULAR_REFRESH_SECONDS:
        return cached
    with engine.connect() as conn:
        row = conn.execute(_PURCHASES_MARKER).one()
        marker = (row.newest,)
        if cached is not None and cached.marker == marker:
            fresh = BestSellers(marker, time.monotonic(), cached.codes, cached.customers, cached.all_time,
                                cached.non_products, cached.reference)
        else:
            rows = conn.execute(_BEST_SELLERS, {"as_of": as_of}).all()
            ranked = sorted((r for r in rows if r.recent), key=lambda r: (-r.recent, r.stock_code))
            fresh = BestSellers(
                marker,
                time.monotonic(),
                tuple(r.stock_code for r in ranked),
                {r.stock_code: int(r.recent) for r in ranked},
                {r.stock_code: int(r.ever) for r in rows},
                frozenset(conn.execute(text("SELECT stock_code FROM products WHERE is_non_product")).scalars()),
                conn.execute(_REFERENCE, {"as_of": as_of}).scalar_one(),
            )
    with _cache_lock:
        _cache[key] = fresh
    return fresh


def copurchase_neighbours(settings: Settings, codes: Sequence[str]) -> Neighbours:
    """The strongest partners of `codes` (and of every product read before), from the `copurchase`
    view; forgotten after an ingest, which refreshes the view."""
    engine = get_engine(settings)
    key = ("neighbours", str(engine.url))
    cached = _cache.get(key)
    if (cached is not None and time.monotonic() - cached.checked_at < POPULAR_REFRESH_SECONDS
            and not set(codes) - cached.partners.keys()):
        return cached
    with engine.connect() as conn:
        row = conn.execute(_COPURCHASE_MARKER).one()
        marker = (row.run, row.finished)
        if cached is None or cached.marker != marker:
            cached = Neighbours(marker)
            with _cache_lock:
                _cache[key] = cached
        cached.checked_at = time.monotonic()
        cached.read(conn, codes)
    return cached


def read_all_copurchase_neighbours(settings: Settings) -> Neighbours:
    """Every product's strongest partners in one statement (a worker, ahead of its first batch).

    Read code by code as batches first need them, a fresh worker process spent about 0.45 s of its CPU over
    its first few thousand jobs on the bundled data (180k partner rows in many small statements); the
    partners are the same either way.
    """
    with get_engine(settings).connect() as conn:
        codes = conn.execute(text("SELECT stock_code FROM products ORDER BY stock_code")).scalars().all()
    return copurchase_neighbours(settings, codes)


def forget_statistics() -> None:
    """Drop the cached best sellers and co-purchase partners (tests that change purchases in place)."""
    with _cache_lock:
        _cache.clear()


@dataclass(frozen=True)
class Partners:
    """A customer's co-purchase partners, strongest first (most invoices shared with the recent
    purchases, summed; then stock code), with the most shared with one recent purchase and which."""

    codes: list[str]
    total: np.ndarray
    best: np.ndarray
    with_codes: list[str]

    @cached_property
    def position(self) -> dict[str, int]:
        return {code: i for i, code in enumerate(self.codes)}

    def __contains__(self, code: str) -> bool:
        return code in self.position

    def strength(self, code: str) -> float:
        return float(self.total[self.position[code]])


NO_PARTNERS = Partners([], np.zeros(0), np.zeros(0), [])


def bought_together(neighbours: Neighbours, recent: Sequence[str]) -> Partners:
    """The partners of the recent purchases (each contributing its `NEIGHBOURS` strongest)."""
    with_codes = [code for code in recent if len(neighbours.partners.get(code, ((),))[0])]
    if not with_codes:
        return NO_PARTNERS
    found = [neighbours.partners[code] for code in with_codes]
    owners = np.repeat(np.arange(len(found)), [len(p) for p, _ in found])
    partners = np.concatenate([p for p, _ in found])
    counts = np.concatenate([c for _, c in found])
    totals = np.bincount(partners, weights=counts, minlength=len(neighbours.codes))
    order = np.lexsort((owners, -counts, partners))  # per partner: most invoices first, then most recent
    first = order[np.r_[True, partners[order][1:] != partners[order][:-1]]]
    ids, best, owner = partners[first], counts[first], owners[first]
    strongest = np.lexsort((neighbours.code_order()[ids], -totals[ids]))
    ids, best, owner = ids[strongest], best[strongest], owner[strongest]
    # lists indexed with Python ints: with numpy's, each element made a scalar object (half this function's self time)
    codes = neighbours.codes
    return Partners([codes[i] for i in ids.tolist()], totals[ids], best, [with_codes[o] for o in owner.tolist()])


# ---------------------------------------------------------------- the batch statement

_RECENT = text(
    """
    SELECT customer_id, stock_code FROM (
        SELECT customer_id, stock_code,
               row_number() OVER (PARTITION BY customer_id ORDER BY max(invoiced_at) DESC, stock_code) AS n
        FROM purchases
        WHERE customer_id = ANY(CAST(:customers AS bigint[]))
          AND (CAST(:as_of AS timestamp) IS NULL OR invoiced_at < CAST(:as_of AS timestamp))
        GROUP BY customer_id, stock_code
    ) ranked
    WHERE n <= :history_items
    ORDER BY customer_id, n
    """
)

_CANDIDATES = text(
    """
    WITH ref AS (
        SELECT CAST(:reference AS timestamp) AS at
    ),
    req AS (
        SELECT r.ord, r.customer_id, r.exclude, r.query_text, r.query_vector
        FROM unnest(CAST(:customers AS bigint[]), CAST(:excludes AS boolean[]), CAST(:query_vectors AS vector[]),
                    CAST(:query_texts AS text[]))
             WITH ORDINALITY AS r(customer_id, exclude, query_vector, query_text, ord)
    ),
    bought AS MATERIALIZED (
        SELECT l.customer_id, l.stock_code, count(*) AS times, max(l.invoiced_at) AS last_at,
               -- summed in a fixed order: a float sum's last bits follow the order, which follows the plan
               sum(power(0.5, greatest(extract(epoch FROM ref.at - l.invoiced_at), 0) / 86400.0 / :half_life)
                   ORDER BY l.invoiced_at, l.invoice_no) AS repeat_score
        FROM (
            SELECT DISTINCT pu.customer_id, pu.stock_code, pu.invoice_no, pu.invoiced_at
            FROM purchases pu
            WHERE pu.customer_id = ANY(CAST(:customer_set AS bigint[]))
              AND (CAST(:as_of AS timestamp) IS NULL OR pu.invoiced_at < CAST(:as_of AS timestamp))
        ) l CROSS JOIN ref
        GROUP BY l.customer_id, l.stock_code
    ),
    hvec AS MATERIALIZED (
        SELECT r.customer_id,
               (SELECT l2_normalize(avg(p.embedding ORDER BY p.stock_code)) FROM products p
                WHERE p.stock_code = ANY(r.codes) AND p.embedding IS NOT NULL AND NOT p.is_non_product) AS v
        FROM (
            SELECT customer_id, array_agg(stock_code) AS codes
            FROM unnest(CAST(:recent_customers AS bigint[]), CAST(:recent_codes AS text[]))
                 AS pairs(customer_id, stock_code)
            GROUP BY customer_id
        ) r
    ),
    search AS MATERIALIZED (
        SELECT q.ord, q.customer_id, q.exclude, q.query_vector, q.query_vector IS NOT NULL AS has_query,
               websearch_to_tsquery('english', q.query_text) AS words,
               coalesce(q.query_vector, CAST(h.v AS vector)) AS v, CAST(h.v AS vector) AS hv
        FROM req q LEFT JOIN hvec h USING (customer_id)
    ),
    nearest AS (
        -- the product's description and similarities come from the row the index scan fetched anyway: the
        -- distance to the search vector is the query's (or, without one, the history's) similarity
        SELECT s.ord, n.stock_code, n.matches, n.description,
               CASE WHEN s.has_query THEN 1 - n.distance END AS query_similarity,
               CASE WHEN s.has_query THEN n.history_similarity ELSE 1 - n.distance END AS history_similarity,
               row_number() OVER (PARTITION BY s.ord ORDER BY n.distance, n.stock_code) AS rank
        FROM search s
        CROSS JOIN LATERAL (
            SELECT p.stock_code, p.description, p.embedding <=> s.v AS distance, p.search_tsv @@ s.words AS matches,
                   CASE WHEN s.has_query THEN 1 - (p.embedding <=> s.hv) END AS history_similarity
            FROM products p
            WHERE p.embedding IS NOT NULL AND NOT p.is_non_product
              AND NOT (s.exclude AND EXISTS (
                    SELECT 1 FROM purchases pu
                    WHERE pu.customer_id = s.customer_id AND pu.stock_code = p.stock_code
                      AND (CAST(:as_of AS timestamp) IS NULL OR pu.invoiced_at < CAST(:as_of AS timestamp))))
            ORDER BY p.embedding <=> s.v
            LIMIT CASE WHEN s.has_query THEN greatest(:vector_quota, :query_pool) ELSE :vector_quota END
        ) n
        WHERE s.v IS NOT NULL
    ),
    rep AS (
        SELECT s.ord, b.stock_code,
               row_number() OVER (PARTITION BY s.ord ORDER BY b.repeat_score DESC, b.last_at DESC, b.stock_code) AS rank
        FROM search s
        JOIN bought b ON b.customer_id = s.customer_id
        WHERE NOT s.has_query AND NOT s.exclude AND b.stock_code <> ALL(CAST(:non_products AS text[]))
    ),
    cand AS (
        -- one row per request and product: its ranks, and (for a product the customer bought) the evidence
        SELECT ord, stock_code, min(nr) AS nearest_rank, bool_or(fts) AS matches, min(rr) AS repeat_rank,
               max(times) AS times, max(repeat_score) AS repeat_score, max(last_at) AS last_at,
               max(description) AS description, max(qs) AS query_similarity, max(hs) AS history_similarity
        FROM (
            SELECT ord, stock_code, rank AS nr, matches AS fts, NULL::bigint AS rr, false AS given,
                   NULL::bigint AS times, NULL::double precision AS repeat_score, NULL::timestamp AS last_at,
                   description, query_similarity AS qs, history_similarity AS hs
            FROM nearest
            UNION ALL SELECT ord, stock_code, NULL, NULL, rank, false, NULL, NULL, NULL, NULL, NULL, NULL
            FROM rep WHERE rank <= :repeat_quota
            UNION ALL SELECT g.ord, g.stock_code, NULL, NULL, NULL, true, NULL, NULL, NULL, NULL, NULL, NULL
            FROM unnest(CAST(:given_ords AS int[]), CAST(:given_codes AS text[])) AS g(ord, stock_code)
            UNION ALL SELECT s.ord, b.stock_code, NULL, NULL, NULL, false, b.times, b.repeat_score, b.last_at,
                   NULL, NULL, NULL
            FROM search s JOIN bought b ON b.customer_id = s.customer_id
        ) found
        GROUP BY ord, stock_code
        HAVING min(nr) IS NOT NULL OR min(rr) IS NOT NULL OR bool_or(given)
    )
    SELECT c.ord, c.stock_code, d.description, c.nearest_rank, c.matches, c.repeat_rank,
           d.query_similarity, d.history_similarity,
           c.repeat_score, c.times, extract(epoch FROM ref.at - c.last_at) / 86400.0 AS days_since_bought
    FROM cand c
    JOIN search s USING (ord)
    CROSS JOIN ref
    LEFT JOIN hvec h ON h.customer_id = s.customer_id
    CROSS JOIN LATERAL (  -- a product found by the search has them already; the others are looked up
        SELECT c.description, c.query_similarity, c.history_similarity WHERE c.nearest_rank IS NOT NULL
        UNION ALL
        SELECT p.description, 1 - (p.embedding <=> s.query_vector), 1 - (p.embedding <=> CAST(h.v AS vector))
        FROM products p WHERE c.nearest_rank IS NULL AND p.stock_code = c.stock_code
    ) d
    ORDER BY c.ord, c.nearest_rank NULLS LAST, c.repeat_rank NULLS LAST, c.stock_code
    """
)


def recent_purchases(
    customer_ids: Sequence[int], settings: Settings, as_of: datetime | None = None
) -> dict[int, list[str]]:
    """Each customer's `HISTORY_ITEMS` most recently bought products (before `as_of`), most recent first."""
    recent: dict[int, list[str]] = {c: [] for c in customer_ids}
    if not recent:
        return recent
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            _RECENT, {"customers": sorted(recent), "as_of": as_of, "history_items": HISTORY_ITEMS}
        ).all()
    for r in rows:
        recent[r.customer_id].append(r.stock_code)
    return recent


def candidates_batch(
    requests: Sequence[CandidateRequest],
    settings: Settings,
    *,
    limit: int | None = None,
    as_of: datetime | None = None,
    recent: Mapping[int, Sequence[str]] | None = None,
    split: bool = True,
) -> list[CandidateSet]:
    """Merged candidates for every request (at most `limit`, default `RECSYS_RETRIEVE_K`), in order.

    `recent` maps each customer to their `HISTORY_ITEMS` most recently bought products, most recent
    first (the pipeline has read them already); without it they are read here.

    Unless `split` is off, a batch of `PARALLEL_FROM` requests or more runs as two statements, half the
    requests each, on two connections at once: the statement is Postgres's CPU work (the HNSW searches
    above all) while this process waits, so on two cores the halves take about the time of one, and the
    first half's rows are merged here while the second half's statement still runs. Each request's
    candidates do not depend on the others in its statement, so the answer is the same.
    """
    if not requests:
        return []
    limit = settings.retrieve_k if limit is None else limit
    customer_set = sorted({r.customer_id for r in requests if r.customer_id is not None})
    if recent is None:
        recent = recent_purchases(customer_set, settings, as_of)
    popular = best_sellers(settings, as_of)
    neighbours = copurchase_neighbours(settings, sorted({code for c in customer_set for code in recent.get(c, ())}))
    together = {c: bought_together(neighbours, recent.get(c, ())) for c in customer_set}

    def part(chunk: Sequence[CandidateRequest]) -> list[CandidateSet]:
        return _candidates_of(chunk, settings, limit, as_of, recent, popular, together)

    if not split or len(requests) < PARALLEL_FROM:
        return part(requests)
    half = (len(requests) + 1) // 2
    first = process_thread(CANDIDATES_THREAD).submit(part, requests[:half])
    try:
        second = part(requests[half:])
    finally:
        found = first.result()
    return found + second


# Batches this large run their statement in two halves at once (`candidates_batch`, the pipeline).
PARALLEL_FROM = 8
CANDIDATES_THREAD = "recsys-candidates"


def _candidates_of(
    requests: Sequence[CandidateRequest],
    settings: Settings,
    limit: int,
    as_of: datetime | None,
    recent: Mapping[int, Sequence[str]],
    popular: BestSellers,
    together: Mapping[int, Partners],
) -> list[CandidateSet]:
    """`candidates_batch` for some of a batch's requests: one statement, then each request's sources merged."""
    share = quotas(settings)
    customer_set = sorted({r.customer_id for r in requests if r.customer_id is not None})
    given: list[tuple[int, str]] = []  # co-purchase and popular candidates of requests without a query
    for ord_, request in enumerate(requests, 1):
        if request.query_vector is not None:
            continue
        spare = 3 if request.exclude_purchased else 1  # room for what the exclusion removes
        partners = together.get(request.customer_id, NO_PARTNERS)
        given += [(ord_, code) for code in partners.codes[: spare * share["copurchase"]]]
        given += [(ord_, code) for code in popular.codes[: spare * share["popular"]]]

    recent_pairs = [(c, code) for c in customer_set for code in recent.get(c, ())]
    params = {
        "as_of": as_of,
        "query_vectors": VectorArray(None if r.query_vector is None else np.asarray(r.query_vector, dtype=np.float32)
                                     for r in requests),
        "customers": [r.customer_id for r in requests],
        "excludes": [bool(r.exclude_purchased and r.customer_id is not None) for r in requests],
        "query_texts": [r.query if r.query_vector is not None else None for r in requests],
        "customer_set": customer_set,
        "recent_customers": [c for c, _ in recent_pairs],
        "recent_codes": [code for _, code in recent_pairs],
        "given_ords": [o for o, _ in given],
        "given_codes": [code for _, code in given],
        "half_life": REPEAT_HALF_LIFE_DAYS,
        "query_pool": max(settings.query_pool, 0),
        "vector_quota": share["vector"],
        "repeat_quota": share["repeat"],
        "non_products": list(popular.non_products),
        "reference": popular.reference,
    }
    with get_engine(settings).begin() as conn:
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                          "set_config('hnsw.iterative_scan', 'relaxed_order', true)"), {"ef": str(settings.ef_search)})
        rows = fetch_binary(conn, _CANDIDATES, params)

    by_request: dict[int, list] = {}
    for row in rows:
        by_request.setdefault(row[ORD], []).append(row)
    results = []
    for ord_, request in enumerate(requests, 1):
        found = by_request.get(ord_, [])
        has_query = request.query_vector is not None
        partners = together.get(request.customer_id, NO_PARTNERS)
        ranked = _source_lists(found, has_query, bool(request.exclude_purchased), settings.query_pool, popular,
                               partners)
        sources, order = merge(ranked, share, FUSION_WEIGHTS[has_query], limit)
        by_code = {row[CODE]: row for row in found}
        candidates = [_candidate(by_code[code], sources[code], popular, partners, has_query) for code in order]
        searched = bool(found) and found[0][NEAREST] is not None
        results.append(
            CandidateSet(
                candidates,
                cold_start=request.customer_id is not None and not recent.get(request.customer_id),
                searched_by="query" if has_query else ("history" if searched else None),
                found={source: sum(1 for c in candidates if source in c.sources) for source in SOURCES},
            )
        )
    return results


def merge(
    ranked: Mapping[str, Sequence[str]], share: Mapping[str, int], weights: Mapping[str, float], limit: int
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Each source's list cut to its quota, fused by weighted reciprocal rank: (sources per code, best codes).

    Ties go to the better vector rank, then the stock code.
    """
    sources: dict[str, dict[str, int]] = {}
    score: dict[str, float] = {}
    for source, codes in ranked.items():
        weight = weights[source]
        for rank, code in enumerate(codes[: share[source]], 1):
            sources.setdefault(code, {})[source] = rank
            score[code] = score.get(code, 0.0) + weight / (FUSION_K + rank)
    order = sorted(score, key=lambda code: (-score[code], sources[code].get("vector", NOT_FOUND), code))
    return sources, order[:limit]


def _source_lists(
    rows: Sequence,
    has_query: bool,
    exclude: bool,
    query_pool: int,
    popular: BestSellers,
    partners: Partners,
) -> dict[str, list[str]]:
    """Each source's codes, best first, from one request's rows (which come nearest first).

    Without a query the statement ranked the repeat source and sent the strongest co-purchase
    partners and best sellers. With one, the non-vector sources re-rank the query's pool: its
    `query_pool` nearest that match the query's words (all of them when none does), by
    recency-weighted frequency, invoices shared with the recent purchases, and recent customers.
    """
    nearest = [row for row in rows if row[NEAREST] is not None]
    lists = {"vector": [row[CODE] for row in nearest]}
    if has_query:
        pool = nearest[:query_pool]
        pool = [row for row in pool if row[MATCHES]] or pool
        bought = [] if exclude else [row for row in pool if row[REPEAT_SCORE] is not None]
        bought.sort(key=lambda row: (-row[REPEAT_SCORE], row[DAYS], row[CODE]))
        codes = [row[CODE] for row in pool]
        lists["repeat"] = [row[CODE] for row in bought]
        lists["copurchase"] = sorted((c for c in codes if c in partners), key=lambda c: (-partners.strength(c), c))
        lists["popular"] = sorted((c for c in codes if c in popular.customers),
                                  key=lambda c: (-popular.customers[c], c))
        return lists
    allowed = [row[CODE] for row in rows if not (exclude and row[TIMES] is not None)]
    repeats = sorted((row for row in rows if row[REPEAT_RANK] is not None), key=lambda row: row[REPEAT_RANK])
    lists["repeat"] = [row[CODE] for row in repeats]
    kept = set(allowed)
    lists["copurchase"] = [c for c in partners.codes if c in kept]
    position = popular.position
    lists["popular"] = sorted((c for c in allowed if c in position), key=position.__getitem__)
    return lists


def _candidate(row, sources: dict[str, int], popular: BestSellers, partners: Partners, has_query: bool) -> Candidate:
    """A candidate from its statement row; its retrieval score is the similarity to the vector it was searched by
    (the query's, or else the history's)."""
    evidence: dict[str, float | str] = {}
    for position, key in ((QUERY_SIM, "query_similarity"), (HISTORY_SIM, "history_similarity"),
                          (REPEAT_SCORE, "repeat_score"), (TIMES, "times_bought"), (DAYS, "days_since_bought")):
        if row[position] is not None:
            evidence[key] = float(row[position])
    at = partners.position.get(row[CODE])
    if at is not None:
        evidence.update(copurchase_sum=float(partners.total[at]), copurchase_max=float(partners.best[at]),
                        copurchase_with=partners.with_codes[at])
    evidence["popularity"] = float(popular.all_time.get(row[CODE], 0))
    evidence["popularity_30d"] = float(popular.customers.get(row[CODE], 0))
    score = row[QUERY_SIM] if has_query else row[HISTORY_SIM]
    score = float(score) if score is not None else 0.0
    return Candidate(row[CODE], row[DESCRIPTION], score, sources, evidence)
