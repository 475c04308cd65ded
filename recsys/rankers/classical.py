"""Rankers without a language model: the baselines every LLM ranker has to beat."""

from __future__ import annotations

from collections.abc import Sequence

from recsys.rankers.base import (
    ItemStats,
    RankRequest,
    RankResult,
    copurchase_totals,
    history_candidate_pairs,
    order_by_scores,
)
from recsys.rankers.common import empty_result, retrieval_order, score_dump


class RetrievalRanker:
    """Keeps the vector-search order: the control arm of every comparison."""

    name = "retrieval"
    uses_llm = False

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        results = []
        for request in requests:
            candidates = retrieval_order(request.candidates)
            scores = {c.stock_code: float(c.retrieval_score) for c in candidates}
            order = [c.stock_code for c in candidates]
            results.append(RankResult(order=order, scores=scores, raw_output=score_dump(scores, order)))
        return results


class _CountRanker:
    """Candidates ordered by a purchase count, retrieval order breaking ties; no counts at all is a fallback.

    Subclasses read the counts for the whole batch at once (one statistics lookup per batch).
    """

    uses_llm = False

    def __init__(self, stats: ItemStats) -> None:
        self.stats = stats

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        answered = [request for request in requests if request.candidates]
        counts = iter(self._batch_counts(answered) if answered else [])
        results = []
        for request in requests:
            if not request.candidates:
                results.append(empty_result())
                continue
            candidates = retrieval_order(request.candidates)
            found, info = next(counts)
            scores = {c.stock_code: float(found.get(c.stock_code, 0.0)) for c in candidates}
            order = order_by_scores(candidates, scores)
            results.append(
                RankResult(
                    order=order,
                    scores=scores,
                    raw_output=score_dump(scores, order),
                    fallback=not any(scores.values()),
                    info=info,
                )
            )
        return results

    def _batch_counts(self, requests: Sequence[RankRequest]) -> list[tuple[dict[str, float], dict]]:
        """(count per stock code, info) for each request, in order."""
        raise NotImplementedError


def _codes(request: RankRequest) -> list[str]:
    return [c.stock_code for c in request.candidates]


class PopularityRanker(_CountRanker):
    """Best sellers first: what a shop shows when it knows nothing about the customer."""

    name = "popularity"

    def _batch_counts(self, requests: Sequence[RankRequest]) -> list[tuple[dict[str, float], dict]]:
        counts = self.stats.popularity(list(dict.fromkeys(code for r in requests for code in _codes(r))))
        return [(counts, {}) for _ in requests]


class CopurchaseRanker(_CountRanker):
    """Items bought together with this customer's history first; retrieval order breaks ties."""

    name = "copurchase"

    def _batch_counts(self, requests: Sequence[RankRequest]) -> list[tuple[dict[str, float], dict]]:
        histories = [list(dict.fromkeys(item.stock_code for item in r.history)) for r in requests]
        wanted = dict.fromkeys(
            pair for r, history in zip(requests, histories, strict=True)
            for pair in history_candidate_pairs(history, _codes(r))
        )
        pairs = self.stats.copurchase_pairs(list(wanted)) if wanted else {}
        return [
            (copurchase_totals(pairs, history, _codes(request)), {"history_items": len(history)})
            for request, history in zip(requests, histories, strict=True)
        ]
