"""The one interface every ranker implements, and the value types it trades in.

A ranker takes a batch of requests and returns one result per request, in order. A result
only ever names stock codes that were among that request's candidates: rankers reorder,
they never invent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    stock_code: str
    description: str
    retrieval_score: float


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
