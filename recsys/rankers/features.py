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
from recsys.platform.db import get_engine
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
        SELECT * FROM unnest(CAST(:req_ids AS int[]), CAST(:customers AS bigint[]), CAST(:queries AS vector[]))
            AS r(req, customer_id, query_vector)
    ),
    pairs AS (
        SELECT * FROM unnest(CAST(:pair_reqs AS int[]), CAST(:pair_codes AS text[]), CAST(:pair_bare AS boolean[]))
            AS p(req, stock_code, bare)
    ),
    bare AS (
        SELECT req, stock_code FROM pairs WHERE bare
    ),
    hist AS (
        SELECT DISTINCT * FROM unnest(CAST(:hist_reqs AS int[]), CAST(:hist_codes AS text[])) AS h(req, stock_code)
    ),
    hvec AS (
        SELECT h.req, l2_normalize(avg(pr.embedding)) AS v
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
    SELECT p.req, p.stock_code, p.bare,
           pr.price AS price,
           extract(epoch FROM ref.at - cu.last_purchase_at) / 86400.0 AS days_since_last_purchase,
           coalesce(cu.purchase_count, 0) AS customer_purchases,
           CASE WHEN r.query_vector IS NOT NULL THEN 1 - (pr.embedding <=> r.query_vector) END AS query_similarity,
           1 - (pr.embedding <=> hv.v) AS history_similarity,
           coalesce(o.times, 0) AS times_bought,
           extract(epoch FROM ref.at - o.last_at) / 86400.0 AS days_since_bought,
           coalesce(co.total, 0) AS copurchase_sum,
           coalesce(co.best, 0) AS copurchase_max,
           coalesce(pr.customer_count, 0) AS popularity,
           coalesce(rc.customers, 0) AS popularity_30d
    FROM pairs p
    JOIN requests r ON r.req = p.req
    CROSS JOIN ref
    LEFT JOIN products pr ON pr.stock_code = p.stock_code
    LEFT JOIN customers cu ON cu.customer_id = r.customer_id
    LEFT JOIN hvec hv ON p.bare AND hv.req = p.req
    LEFT JOIN own o ON p.bare AND o.customer_id = r.customer_id AND o.stock_code = p.stock_code
    LEFT JOIN co ON p.bare AND co.req = p.req AND co.stock_code = p.stock_code
    LEFT JOIN recent rc ON p.bare AND rc.stock_code = p.stock_code
    """
)

# Read for every candidate.
_ALWAYS_READ = ("price", "days_since_last_purchase", "customer_purchases")
# Read only for candidates without evidence; otherwise taken from the evidence (default when a key is absent).
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
_BARE_READ = tuple(name for name in _EVIDENCE_DEFAULTS if name != "repeat_score")


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _query_vectors(
    requests: Sequence[RankRequest], settings: Settings, wanted: Sequence[int]
) -> list[np.ndarray | None]:
    """The query embeddings of the `wanted` requests (None elsewhere), sent as pgvector values; repeated
    queries come from the encoder's per-process cache, so the pipeline's own encoding is reused."""
    from recsys.catalog.embedding import encode_queries

    queries = list(dict.fromkeys(requests[i].query for i in wanted if requests[i].query))
    out: list[np.ndarray | None] = [None] * len(requests)
    if not queries:
        return out
    vectors = dict(zip(queries, encode_queries(queries, settings), strict=True))
    for i in wanted:
        if requests[i].query:
            out[i] = vectors[requests[i].query]
    return out


def _evidence_value(evidence, name: str) -> float:
    value = evidence.get(name)
    return _EVIDENCE_DEFAULTS[name] if value is None or isinstance(value, str) else float(value)


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
    pairs = [(index, c.stock_code, not c.evidence) for index, r in enumerate(requests) for c in r.candidates]
    values: dict[tuple[int, str], dict[str, float]] = {}
    if pairs:
        bare_requests = sorted({index for index, _, bare in pairs if bare})
        history = [(i, h.stock_code) for i in bare_requests for h in requests[i].history]
        params = {
            "req_ids": list(range(len(requests))),
            "customers": [r.customer_id for r in requests],
            "queries": _query_vectors(requests, settings, bare_requests),
            "pair_reqs": [index for index, _, _ in pairs],
            "pair_codes": [code for _, code, _ in pairs],
            "pair_bare": [bare for _, _, bare in pairs],
            "hist_reqs": [index for index, _ in history],
            "hist_codes": [code for _, code in history],
            "bare_customers": sorted({requests[i].customer_id for i in bare_requests} - {None}),
            "bare_codes": sorted({code for _, code, bare in pairs if bare}),
        }
        with get_engine(settings).connect() as conn:
            for row in conn.execute(_STATEMENT, params):
                read = _ALWAYS_READ + (_BARE_READ if row.bare else ())
                values[(row.req, row.stock_code)] = {name: _number(getattr(row, name)) for name in read}
    column = {name: position for position, name in enumerate(names)}
    matrices = []
    for index, request in enumerate(requests):
        matrix = np.full((len(request.candidates), len(names)), np.nan, dtype=np.float32)
        if len(request.candidates):
            matrix[:, column["has_query"]] = 1.0 if request.query else 0.0
            matrix[:, column["history_items"]] = len(request.history)
        scores = llm_scores[index] if llm_scores is not None else None
        for row, candidate in enumerate(request.candidates):
            read = values.get((index, candidate.stock_code), {})
            for name, value in read.items():
                matrix[row, column[name]] = value
            if candidate.evidence:
                for name in _EVIDENCE_DEFAULTS:
                    matrix[row, column[name]] = _evidence_value(candidate.evidence, name)
            sources = candidate_sources(candidate, row)
            for source in SOURCES:
                rank = sources.get(source)
                matrix[row, column[f"in_{source}"]] = 0.0 if rank is None else 1.0
                if rank is not None:
                    matrix[row, column[f"{source}_rank"]] = rank
            matrix[row, column["source_count"]] = sum(1 for source in SOURCES if source in sources)
            if scores is not None and candidate.stock_code in scores:
                matrix[row, column[LLM_FEATURE]] = scores[candidate.stock_code]
        matrices.append(matrix)
    return BatchFeatures(names=names, matrices=matrices)
