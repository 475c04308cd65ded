"""Per-candidate features for the learned rankers, read for a whole batch in one SQL statement.

Most values come with the candidates: the candidate stage attaches `Candidate.evidence` (similarity
to the query and to the history vector, the customer's purchases of it, co-purchase strength,
popularity; names in `recsys.rankers.base.EVIDENCE_FIELDS`) and `Candidate.sources`. This module
adds what the evidence does not hold (price, the customer's recency and purchase count) in one
statement per batch. Candidates that carry no evidence at all (built by hand, or by a caller
outside the pipeline) get the same values computed here, in the same statement and with the
same definitions, so a model sees the same numbers either way.

Training and serving build features with this same code against a database: training points it
at a snapshot that holds only purchases before its inner cutoff, serving at the live database.
Every "days since" is counted from the database's newest purchase, not from the wall clock, so a
snapshot of 2011 and a live shop are on the same footing.

Feature names are the model file's contract (`FEATURES`, plus `LLM_FEATURE` for `learned-llm`);
a model trained for other names is refused. Missing values are NaN (LightGBM treats them as
missing): a similarity to a query that was not given, a rank in a source that did not find the
candidate, days since the customer bought a product they never bought.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import VectorArray, get_engine
from recsys.rankers.base import Candidate, RankRequest

SOURCES = ("vector", "repeat", "copurchase", "popular")
RECENT_DAYS = 30

REQUEST_FEATURES = ("has_query", "days_since_last_purchase", "customer_purchases", "history_items")
SOURCE_FEATURES = tuple(f"{source}_rank" for source in SOURCES) + tuple(f"in_{source}" for source in SOURCES) + (
    "source_count",
)
CANDIDATE_FEATURES = (
    "query_similarity",
    "history_similarity",
    "repeat_score",
    "times_bought",
    "days_since_bought",
    "copurchase_sum",
    "copurchase_max",
    "popularity",
    "popularity_30d",
    "price",
)
FEATURES: tuple[str, ...] = CANDIDATE_FEATURES + SOURCE_FEATURES + REQUEST_FEATURES
LLM_FEATURE = "llm_score"

FEATURE_DESCRIPTIONS = {
    "query_similarity": "cosine similarity of the candidate to the query text",
    "history_similarity": "cosine similarity to the mean embedding of the recent purchases",
    "repeat_score": "the customer's recency-weighted purchase frequency of it",
    "times_bought": "invoices in which this customer bought the candidate",
    "days_since_bought": "days since this customer last bought the candidate",
    "copurchase_sum": "invoices shared with the recent purchases, summed over them",
    "copurchase_max": "invoices shared with the recent purchase it is bought with most",
    "popularity": "customers who ever bought it",
    "popularity_30d": f"customers who bought it in the last {RECENT_DAYS} days",
    "price": "median unit price",
    **{f"{source}_rank": f"rank in the {source} source" for source in SOURCES},
    **{f"in_{source}": f"found by the {source} source" for source in SOURCES},
    "source_count": "number of sources that found it",
    "has_query": "the request has query text",
    "days_since_last_purchase": "days since the customer's last purchase",
    "customer_purchases": "the customer's purchase lines",
    "history_items": "recent purchases the request carries",
    LLM_FEATURE: "the zero-shot LLM score (ranked window only)",
}


def feature_names(with_llm: bool = False) -> tuple[str, ...]:
    return FEATURES + ((LLM_FEATURE,) if with_llm else ())


def candidate_sources(candidate: Candidate, position: int) -> Mapping[str, int]:
    """Source name → 1-based rank; a candidate without tags came from vector search at its position."""
    sources = getattr(candidate, "sources", None)
    return sources if sources else {"vector": position + 1}


@dataclass(frozen=True)
class BatchFeatures:
    """One matrix per request (rows in candidate order, columns `names`)."""

    names: tuple[str, ...]
    matrices: list[np.ndarray]

    def stacked(self) -> np.ndarray:
        if not self.matrices:
            return np.empty((0, len(self.names)), dtype=np.float32)
        return np.vstack(self.matrices)


_STATEMENT = text(
    f"""
    WITH ref AS (
        SELECT coalesce(max(last_purchase_at), localtimestamp) AS at FROM customers
    ),
    requests AS (
        SELECT * FROM unnest(CAST(:req_ids AS int[]), CAST(:customers AS bigint[])) AS r(req, customer_id)
    ),
    bare AS (
        SELECT * FROM unnest(CAST(:bare_reqs AS int[]), CAST(:bare_pair_codes AS text[])) AS b(req, stock_code)
    ),
    queries AS (
        SELECT * FROM unnest(CAST(:query_reqs AS int[]), CAST(:query_vectors AS vector[])) AS q(req, query_vector)
    ),
    hist AS (
        SELECT DISTINCT * FROM unnest(CAST(:hist_reqs AS int[]), CAST(:hist_codes AS text[])) AS h(req, stock_code)
    ),
    hvec AS (
        SELECT h.req, l2_normalize(avg(pr.embedding ORDER BY pr.stock_code)) AS v
        FROM hist h JOIN products pr USING (stock_code)
        WHERE pr.embedding IS NOT NULL AND NOT pr.is_non_product
        GROUP BY h.req
    ),
    own AS (
        SELECT customer_id, stock_code, count(DISTINCT invoice_no) AS times, max(invoiced_at) AS last_at
        FROM purchases
        WHERE customer_id = ANY(CAST(:bare_customers AS bigint[]))
        GROUP BY customer_id, stock_code
    ),
    co AS (
        SELECT h.req, c.other_stock_code AS stock_code, sum(c.invoices) AS total, max(c.invoices) AS best
        FROM hist h
        JOIN copurchase c ON c.stock_code = h.stock_code
        JOIN bare b ON b.req = h.req AND b.stock_code = c.other_stock_code
        GROUP BY h.req, c.other_stock_code
    ),
    recent AS (
        SELECT pu.stock_code, count(DISTINCT pu.customer_id) AS customers
        FROM purchases pu, ref
        WHERE pu.stock_code = ANY(CAST(:bare_codes AS text[]))
          AND pu.invoiced_at >= ref.at - interval '{RECENT_DAYS} days'
        GROUP BY pu.stock_code
    )
    SELECT 'product' AS kind, NULL::int AS req, pr.stock_code, pr.price::float8 AS a, NULL::float8 AS b,
           NULL::float8 AS c, NULL::float8 AS d, NULL::float8 AS e, NULL::float8 AS f, NULL::float8 AS g,
           NULL::float8 AS h, NULL::float8 AS i
    FROM products pr WHERE pr.stock_code = ANY(CAST(:codes AS text[]))
    UNION ALL
    SELECT 'request', r.req, NULL, extract(epoch FROM ref.at - cu.last_purchase_at) / 86400.0,
           coalesce(cu.purchase_count, 0), NULL, NULL, NULL, NULL, NULL, NULL, NULL
    FROM requests r CROSS JOIN ref LEFT JOIN customers cu ON cu.customer_id = r.customer_id
    UNION ALL
    SELECT 'bare', b.req, b.stock_code,
           1 - (pr.embedding <=> q.query_vector),
           1 - (pr.embedding <=> hv.v),
           coalesce(o.times, 0),
           extract(epoch FROM ref.at - o.last_at) / 86400.0,
           coalesce(co.total, 0),
           coalesce(co.best, 0),
           coalesce(pr.customer_count, 0),
           coalesce(rc.customers, 0),
           NULL
    FROM bare b
    JOIN requests r ON r.req = b.req
    CROSS JOIN ref
    LEFT JOIN products pr ON pr.stock_code = b.stock_code
    LEFT JOIN queries q ON q.req = b.req
    LEFT JOIN hvec hv ON hv.req = b.req
    LEFT JOIN own o ON o.customer_id = r.customer_id AND o.stock_code = b.stock_code
    LEFT JOIN co ON co.req = b.req AND co.stock_code = b.stock_code
    LEFT JOIN recent rc ON rc.stock_code = b.stock_code
    """
)
# Column order of a 'bare' row (candidates without evidence) after kind, req, stock_code.
_BARE_COLUMNS = ("query_similarity", "history_similarity", "times_bought", "days_since_bought", "copurchase_sum",
                 "copurchase_max", "popularity", "popularity_30d")

# Taken from the candidate stage's evidence, with these values where a key is absent.
_EVIDENCE_DEFAULTS = {
    "query_similarity": math.nan,
    "history_similarity": math.nan,
    "repeat_score": 0.0,
    "times_bought": 0.0,
    "days_since_bought": math.nan,
    "copurchase_sum": 0.0,
    "copurchase_max": 0.0,
    "popularity": 0.0,
    "popularity_30d": 0.0,
}


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _query_vectors(requests: Sequence[RankRequest], settings: Settings, wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """The query embeddings of the `wanted` requests that have a query (sent as pgvector values);
    repeated queries come from the encoder's per-process cache, so the pipeline's own encoding is reused."""
    from recsys.catalog.embedding import encode_queries

    queries = list(dict.fromkeys(requests[i].query for i in wanted if requests[i].query))
    if not queries:
        return {}
    vectors = dict(zip(queries, encode_queries(queries, settings), strict=True))
    return {i: vectors[requests[i].query] for i in wanted if requests[i].query}


def read_features(
    requests: Sequence[RankRequest],
    settings: Settings,
    *,
    llm_scores: Sequence[Mapping[str, float] | None] | None = None,
) -> BatchFeatures:
    """Feature matrices for every candidate of every request, from one SQL statement.

    `llm_scores` (for `learned-llm`): per request, the LLM's score of the candidates it saw
    (the ranked window); the others get NaN. Without it the names are `FEATURES`.
    """
    names = feature_names(with_llm=llm_scores is not None)
    prices: dict[str, float] = {}
    customer_values: dict[int, tuple[float, float]] = {}
    bare_values: dict[tuple[int, str], tuple[float, ...]] = {}
    if any(r.candidates for r in requests):
        bare = [(i, c.stock_code) for i, r in enumerate(requests) for c in r.candidates if not c.evidence]
        bare_requests = sorted({i for i, _ in bare})
        history = [(i, h.stock_code) for i in bare_requests for h in requests[i].history]
        queries = _query_vectors(requests, settings, bare_requests)
        params = {
            "req_ids": list(range(len(requests))),
            "customers": [r.customer_id for r in requests],
            "codes": sorted({c.stock_code for r in requests for c in r.candidates}),
            "bare_reqs": [i for i, _ in bare],
            "bare_pair_codes": [code for _, code in bare],
            "query_reqs": list(queries),
            "query_vectors": VectorArray(queries.values()),
            "hist_reqs": [i for i, _ in history],
            "hist_codes": [code for _, code in history],
            "bare_customers": sorted({requests[i].customer_id for i in bare_requests} - {None}),
            "bare_codes": sorted({code for _, code in bare}),
        }
        with get_engine(settings).connect() as conn:
            for kind, req, code, *values in conn.execute(_STATEMENT, params):
                if kind == "product":
                    prices[code] = _number(values[0])
                elif kind == "request":
                    customer_values[req] = (_number(values[0]), _number(values[1]))
                else:
                    bare_values[(req, code)] = tuple(_number(v) for v in values[: len(_BARE_COLUMNS)])
    missing = math.nan
    bare_defaults = dict(_EVIDENCE_DEFAULTS, repeat_score=missing)  # not computed for candidates without evidence
    matrices = []
    for index, request in enumerate(requests):
        candidates = request.candidates
        count = len(candidates)
        evidence = [
            c.evidence or dict(zip(_BARE_COLUMNS, bare_values.get((index, c.stock_code), ()), strict=False))
            for c in candidates
        ]
        defaults = [_EVIDENCE_DEFAULTS if c.evidence else bare_defaults for c in candidates]
        sources = [candidate_sources(c, position) for position, c in enumerate(candidates)]
        days_since, purchases = customer_values.get(index, (missing, missing))
        columns: dict[str, object] = {
            "has_query": 1.0 if request.query else 0.0,
            "history_items": float(len(request.history)),
            "days_since_last_purchase": days_since,
            "customer_purchases": purchases,
            "price": [prices.get(c.stock_code, missing) for c in candidates],
            "source_count": [float(sum(1 for source in SOURCES if source in found)) for found in sources],
        }
        for name in _EVIDENCE_DEFAULTS:
            columns[name] = [
                default[name] if (value := found.get(name)) is None or isinstance(value, str) else value
                for found, default in zip(evidence, defaults, strict=True)
            ]
        for source in SOURCES:
            columns[f"{source}_rank"] = [found.get(source, missing) for found in sources]
            columns[f"in_{source}"] = [1.0 if source in found else 0.0 for found in sources]
        if llm_scores is not None:
            scores = llm_scores[index] or {}
            columns[LLM_FEATURE] = [scores.get(c.stock_code, missing) for c in candidates]
        matrix = np.empty((count, len(names)), dtype=np.float32)
        for position, name in enumerate(names):
            matrix[:, position] = columns[name]
        matrices.append(matrix)
    return BatchFeatures(names=names, matrices=matrices)
