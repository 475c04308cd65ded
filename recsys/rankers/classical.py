"""Rankers without a language model: the baselines every LLM ranker has to beat."""

from __future__ import annotations

from collections.abc import Sequence

from recsys.rankers.base import ItemStats, RankRequest, RankResult, order_by_scores
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


class PopularityRanker:
    """Best sellers first: what a shop shows when it knows nothing about the customer."""

    name = "popularity"
    uses_llm = False

    def __init__(self, stats: ItemStats) -> None:
        self.stats = stats

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        results = []
        for request in requests:
            candidates = retrieval_order(request.candidates)
            if not candidates:
                results.append(empty_result())
                continue
            counts = self.stats.popularity([c.stock_code for c in candidates])
            scores = {c.stock_code: float(counts.get(c.stock_code, 0.0)) for c in candidates}
            order = order_by_scores(candidates, scores)
            results.append(
                RankResult(
                    order=order,
                    scores=scores,
                    raw_output=score_dump(scores, order),
                    fallback=not any(scores.values()),
                )
            )
        return results


class CopurchaseRanker:
    """Items bought together with this customer's history first; retrieval order breaks ties."""

    name = "copurchase"
    uses_llm = False

    def __init__(self, stats: ItemStats) -> None:
        self.stats = stats

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        results = []
        for request in requests:
            candidates = retrieval_order(request.candidates)
            if not candidates:
                results.append(empty_result())
                continue
            history = list(dict.fromkeys(item.stock_code for item in request.history))
            codes = [c.stock_code for c in candidates]
            counts = self.stats.copurchase(history, codes) if history else {}
            scores = {code: float(counts.get(code, 0.0)) for code in codes}
            order = order_by_scores(candidates, scores)
            results.append(
                RankResult(
                    order=order,
                    scores=scores,
                    raw_output=score_dump(scores, order),
                    fallback=not any(scores.values()),
                    info={"history_items": len(history)},
                )
            )
        return results
