"""Per-candidate features for the learned rankers, read for a whole batch in one SQL statement.

Training and serving build features with this same code against a database: training points it
at a snapshot that holds only purchases before its inner cutoff, serving at the live database.
Every "days since" is counted from the database's newest purchase (`max(customers.last_purchase_at)`),
not from the wall clock, so a snapshot of 2011 and a live shop are on the same footing.

Feature names are the model file's contract (`FEATURES`, plus `LLM_FEATURE` for `learned-llm`);
a model trained for other names is refused. Missing values are NaN (LightGBM treats them as missing):
a similarity to a query that was not given, a rank in a source that did not find the candidate,
days since the customer bought a product they never bought.
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
        SELECT * FROM unnest(CAST(:pair_reqs AS int[]), CAST(:pair_codes AS text[])) AS p(req, stock_code)
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
        WHERE customer_id = ANY(CAST(:customer_set AS bigint[]))
        GROUP BY customer_id, stock_code
    ),
    co AS (
        SELECT h.req, c.other_stock_code AS stock_code, sum(c.invoices) AS total, max(c.invoices) AS best
        FROM hist h
        JOIN copurchase c ON c.stock_code = h.stock_code
        JOIN pairs p ON p.req = h.req AND p.stock_code = c.other_stock_code
        GROUP BY h.req, c.other_stock_code
    ),
    recent AS (
        SELECT pu.stock_code, count(DISTINCT pu.customer_id) AS customers
        FROM purchases pu, ref
        WHERE pu.stock_code = ANY(CAST(:code_set AS text[]))
          AND pu.invoiced_at >= ref.at - interval '{RECENT_DAYS} days'
        GROUP BY pu.stock_code
    )
    SELECT p.req, p.stock_code,
           CASE WHEN r.query_vector IS NOT NULL THEN 1 - (pr.embedding <=> r.query_vector) END AS query_similarity,
           1 - (pr.embedding <=> hv.v) AS history_similarity,
           coalesce(o.times, 0) AS times_bought,
           extract(epoch FROM ref.at - o.last_at) / 86400.0 AS days_since_bought,
           coalesce(co.total, 0) AS copurchase_sum,
           coalesce(co.best, 0) AS copurchase_max,
           coalesce(pr.customer_count, 0) AS popularity,
           coalesce(rc.customers, 0) AS popularity_30d,
           pr.price AS price,
           extract(epoch FROM ref.at - cu.last_purchase_at) / 86400.0 AS days_since_last_purchase,
           coalesce(cu.purchase_count, 0) AS customer_purchases
    FROM pairs p
    JOIN requests r ON r.req = p.req
    CROSS JOIN ref
    LEFT JOIN products pr ON pr.stock_code = p.stock_code
    LEFT JOIN hvec hv ON hv.req = p.req
    LEFT JOIN own o ON o.customer_id = r.customer_id AND o.stock_code = p.stock_code
    LEFT JOIN customers cu ON cu.customer_id = r.customer_id
    LEFT JOIN co ON co.req = p.req AND co.stock_code = p.stock_code
    LEFT JOIN recent rc ON rc.stock_code = p.stock_code
    """
)

_SQL_COLUMNS = (
    "query_similarity",
    "history_similarity",
    "times_bought",
    "days_since_bought",
    "copurchase_sum",
    "copurchase_max",
    "popularity",
    "popularity_30d",
    "price",
    "days_since_last_purchase",
    "customer_purchases",
)


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _query_vectors(requests: Sequence[RankRequest], settings: Settings) -> list[str | None]:
    """pgvector literals of the requests' query embeddings (None without query); repeated
    queries come from the encoder's per-process cache, so the pipeline's own encoding is reused."""
    from recsys.catalog.embedding import encode_queries, vector_literal

    queries = list(dict.fromkeys(r.query for r in requests if r.query))
    if not queries:
        return [None] * len(requests)
    vectors = dict(zip(queries, encode_queries(queries, settings), strict=True))
    return [vector_literal(vectors[r.query]) if r.query else None for r in requests]


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
    pairs = [(index, c.stock_code) for index, r in enumerate(requests) for c in r.candidates]
    values: dict[tuple[int, str], tuple] = {}
    if pairs:
        history = [(index, h.stock_code) for index, r in enumerate(requests) for h in r.history]
        customers = [r.customer_id for r in requests]
        params = {
            "req_ids": list(range(len(requests))),
            "customers": customers,
            "queries": _query_vectors(requests, settings),
            "pair_reqs": [index for index, _ in pairs],
            "pair_codes": [code for _, code in pairs],
            "hist_reqs": [index for index, _ in history],
            "hist_codes": [code for _, code in history],
            "customer_set": sorted({c for c in customers if c is not None}),
            "code_set": sorted({code for _, code in pairs}),
        }
        with get_engine(settings).connect() as conn:
            for row in conn.execute(_STATEMENT, params):
                values[(row.req, row.stock_code)] = tuple(_number(getattr(row, col)) for col in _SQL_COLUMNS)
    column = {name: position for position, name in enumerate(names)}
    sql_columns = [column[name] for name in _SQL_COLUMNS]
    missing = (math.nan,) * len(_SQL_COLUMNS)
    matrices = []
    for index, request in enumerate(requests):
        matrix = np.full((len(request.candidates), len(names)), np.nan, dtype=np.float32)
        if len(request.candidates):
            matrix[:, column["has_query"]] = 1.0 if request.query else 0.0
            matrix[:, column["history_items"]] = len(request.history)
        scores = llm_scores[index] if llm_scores is not None else None
        for row, candidate in enumerate(request.candidates):
            matrix[row, sql_columns] = values.get((index, candidate.stock_code), missing)
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
