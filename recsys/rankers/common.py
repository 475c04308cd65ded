"""Helpers every ranker shares: retrieval order, complete results, compact score dumps."""

from __future__ import annotations

import json
from collections.abc import Sequence

from recsys.rankers.base import Candidate, RankResult


def unique_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates with repeated stock codes dropped (first kept), so results stay permutations."""
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        if candidate.stock_code not in seen:
            seen.add(candidate.stock_code)
            unique.append(candidate)
    return unique


def retrieval_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Unique candidates by retrieval score, best (highest) first; ties keep the given order."""
    return sorted(unique_candidates(candidates), key=lambda c: -c.retrieval_score)


def score_dump(scores: dict[str, float], order: Sequence[str], digits: int = 4) -> str:
    """A short JSON record of the scores in ranked order, for `RankResult.raw_output`."""
    return json.dumps({code: round(float(scores[code]), digits) for code in order}, separators=(",", ":"))


def scores_below(floor: float, codes: Sequence[str]) -> dict[str, float]:
    """Scores under `floor` that keep `codes` in their given order (for candidates past the cap)."""
    return {code: floor - 1.0 - offset for offset, code in enumerate(codes)}


def empty_result(**info) -> RankResult:
    return RankResult(order=[], scores={}, raw_output="", info=dict(info))
