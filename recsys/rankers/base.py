"""The one interface every ranker implements, and the value types it trades in.

A ranker takes a batch of requests and returns one result per request, in order. A result
only ever names stock codes that were among that request's candidates: rankers reorder,
they never invent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

CANDIDATE_SOURCES = ("vector", "repeat", "copurchase", "popular")

EVIDENCE_FIELDS = {
    "query_similarity": "cosine similarity to the query text's embedding (requests with a query)",
    "history_similarity": "cosine similarity to the mean embedding of the customer's recent purchases",
    "repeat_score": "the customer's recency-weighted purchase frequency of it (each invoice weighs "
    "0.5 ** (age in days / 180), recsys.recommend.candidates.REPEAT_HALF_LIFE_DAYS)",
    "times_bought": "invoices in which the customer bought it",
    "days_since_bought": "days from the customer's last purchase of it to the reference time",
    "copurchase_sum": "invoices it shares with the customer's recent purchases, summed over them",
    "copurchase_max": "invoices it shares with the one recent purchase it is bought with most",
    "copurchase_with": "that recent purchase's stock code (a str, the only non-number)",
    "popularity": "customers who ever bought it",
    "popularity_30d": "customers who bought it in the 30 days up to the reference time",
}


@dataclass(frozen=True)
class Candidate:
    """A product a ranker may order, with where it came from and what the database knows about it.

    `retrieval_score` is the cosine similarity to the request's search vector (the query text, or
    the mean embedding of the recent purchases without one); the `retrieval` ranker orders by it.

    `sources` maps each source that found it (`CANDIDATE_SOURCES`) to its 1-based rank there:
    `vector` (nearest by embedding), `repeat` (the customer's own purchases by recency-weighted
    frequency), `copurchase` (bought in the same invoices as the recent purchases, by invoices
    shared), `popular` (customers in the last 30 days). Empty when the caller built the candidate
    by hand (tests, old callers).

    `evidence` holds what the candidate stage read for every merged candidate, whichever source
    found it; keys are `EVIDENCE_FIELDS` (stable names; a key is absent where it does not apply,
    e.g. no purchase of it, no query, no shared invoice). "Reference time" is the candidate
    stage's `as_of` when given, else the newest purchase in the database (not the wall clock,
    so a 2011 snapshot and a live shop compare alike).
    """

    stock_code: str
    description: str
    retrieval_score: float
    sources: Mapping[str, int] = field(default_factory=dict, hash=False)
    evidence: Mapping[str, float | str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class HistoryItem:
    stock_code: str
    description: str


@dataclass(frozen=True)
class RankRequest:
    """One customer's ranking problem. History is most recent first."""

    candidates: Sequence[Candidate]
    history: Sequence[HistoryItem] = ()
    query: str | None = None
    customer_id: int | None = None
    explain: bool = False


@dataclass
class RankResult:
    """Candidates' stock codes best first, a score per code, and what the model said."""

    order: list[str]
    scores: dict[str, float]
    explanations: dict[str, str] | None = None
    raw_output: str | None = None
    repaired: bool = False
    fallback: bool = False
    info: dict = field(default_factory=dict)


class ItemStats(Protocol):
    """Purchase statistics the classical rankers read (popularity, co-purchase).

    Production reads them from Postgres; the evaluation builds them from purchases before
    its cutoff so nothing after it leaks in.
    """

    def popularity(self, stock_codes: Sequence[str]) -> dict[str, float]: ...

    def copurchase(self, history_codes: Sequence[str], candidate_codes: Sequence[str]) -> dict[str, float]: ...

    def copurchase_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]: ...


def history_candidate_pairs(history_codes: Sequence[str], candidate_codes: Sequence[str]) -> list[tuple[str, str]]:
    """Every (history code, candidate code) pair, each once."""
    candidates = list(dict.fromkeys(candidate_codes))
    return [(code, candidate) for code in dict.fromkeys(history_codes) for candidate in candidates]


def copurchase_totals(
    pairs: dict[tuple[str, str], float], history_codes: Sequence[str], candidate_codes: Sequence[str]
) -> dict[str, float]:
    """Per candidate, the invoices it shares with any of the history items (candidates with none left out).

    `pairs` maps (history code, candidate code) to invoices together (pairs with none may be absent)
    and may hold other requests' pairs too, so one lookup can serve a whole batch.
    """
    history = list(dict.fromkeys(history_codes))
    totals = {}
    for candidate in dict.fromkeys(candidate_codes):
        total = sum(pairs.get((code, candidate), 0.0) for code in history)
        if total:
            totals[candidate] = float(total)
    return totals


class Ranker(Protocol):
    name: str
    uses_llm: bool

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]: ...


def order_by_scores(candidates: Sequence[Candidate], scores: dict[str, float]) -> list[str]:
    """Codes sorted by score, descending; ties keep retrieval order (stable sort)."""
    codes = [c.stock_code for c in candidates]
    return sorted(codes, key=lambda code: -scores.get(code, float("-inf")))
