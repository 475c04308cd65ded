"""Ranking metrics for one ranked list against a set of answers, and their aggregates.

Definitions (k is the cut-off, ranks start at 1, answers are distinct stock codes):

- HitRate@k: 1 if any answer is in the top k, else 0;
- Recall@k: answers in the top k / all answers;
- NDCG@k: sum of 1/log2(rank + 1) over answers in the top k, divided by the best possible
  value, the same sum over ranks 1..min(k, answers);
- MRR@k: 1 / rank of the first answer in the top k, 0 if none.

With one answer (the query task) Recall@k equals HitRate@k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

KS = (5, 10)
METRICS = ("recall", "hit_rate", "ndcg", "mrr")


def answer_ranks(order: Sequence[str], answers: Iterable[str]) -> list[int]:
    """1-based positions of the answers found in `order`, ascending."""
    wanted = set(answers)
    return [rank for rank, code in enumerate(order, 1) if code in wanted]


def hit_rate_at(order: Sequence[str], answers: Iterable[str], k: int) -> float:
    return 1.0 if any(rank <= k for rank in answer_ranks(order, answers)) else 0.0


def recall_at(order: Sequence[str], answers: Iterable[str], k: int) -> float:
    answers = set(answers)
    if not answers:
        return 0.0
    return sum(1 for rank in answer_ranks(order, answers) if rank <= k) / len(answers)


def ndcg_at(order: Sequence[str], answers: Iterable[str], k: int) -> float:
    answers = set(answers)
    if not answers:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank in answer_ranks(order, answers) if rank <= k)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(answers)) + 1))
    return dcg / ideal


def mrr_at(order: Sequence[str], answers: Iterable[str], k: int) -> float:
    ranks = [rank for rank in answer_ranks(order, answers) if rank <= k]
    return 1.0 / ranks[0] if ranks else 0.0


_FUNCTIONS = {"recall": recall_at, "hit_rate": hit_rate_at, "ndcg": ndcg_at, "mrr": mrr_at}


def metric_names(ks: Sequence[int] = KS) -> list[str]:
    return [f"{metric}@{k}" for k in ks for metric in METRICS]


def case_metrics(order: Sequence[str], answers: Iterable[str], ks: Sequence[int] = KS) -> dict[str, float]:
    """Every metric at every k for one ranked list."""
    answers = set(answers)
    return {f"{metric}@{k}": _FUNCTIONS[metric](order, answers, k) for k in ks for metric in METRICS}


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-metric means over cases, with the number of cases as `n` (metrics absent when n is 0)."""
    result: dict[str, float] = {"n": len(rows)}
    if rows:
        for name in rows[0]:
            result[name] = sum(row[name] for row in rows) / len(rows)
    return result


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """Mean of a - b over the same cases with a normal-approximation 95% interval; None below 2 cases."""
    if len(a) != len(b):
        raise ValueError("paired values need the same cases")
    n = len(a)
    if n < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"delta": mean, "low": mean - half, "high": mean + half, "n": n}
