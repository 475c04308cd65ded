"""Stage 4's one rule: the ranker's order over its window first, then the other candidates in retrieval order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def final_order(ranked: Iterable[str], window: Iterable[str], retrieval_order: Sequence[str]) -> list[str]:
    """Codes the ranker placed (kept only if in its window, first occurrence wins), then the rest by retrieval.

    A ranker never invents: anything outside `window` is dropped from its answer, and every
    retrieved candidate it left out follows in retrieval order.
    """
    allowed = set(window)
    order = [code for code in dict.fromkeys(ranked) if code in allowed]
    placed = set(order)
    return order + [code for code in retrieval_order if code not in placed]
