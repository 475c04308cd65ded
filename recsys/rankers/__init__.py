"""Rankers by name: one setting (RECSYS_RANKER) switches between classical and LLM ranking.

LLM modules are imported only when an LLM ranker is asked for, so the classical rankers
work without loading torch or transformers.
"""

from __future__ import annotations

import importlib

from recsys.config import Settings
from recsys.rankers.base import (
    Candidate,
    HistoryItem,
    ItemStats,
    Ranker,
    RankRequest,
    RankResult,
    order_by_scores,
)

CLASSICAL_RANKER_NAMES = ("retrieval", "popularity", "copurchase")
LLM_RANKER_NAMES = ("llm-listwise", "llm-verbalizer", "llm-pointwise", "llm-likelihood")
# Trained LightGBM rankers (recsys/rankers/learned.py); `learned-llm` also loads the LLM for one feature.
LEARNED_RANKER_NAMES = ("learned", "learned-llm")
RANKER_NAMES = CLASSICAL_RANKER_NAMES + LLM_RANKER_NAMES + LEARNED_RANKER_NAMES

_LLM_RANKER_CLASSES = {
    "llm-listwise": ("recsys.rankers.llm_listwise", "ListwiseRanker"),
    "llm-verbalizer": ("recsys.rankers.llm_verbalizer", "VerbalizerRanker"),
    "llm-pointwise": ("recsys.rankers.llm_pointwise", "PointwiseRanker"),
    "llm-likelihood": ("recsys.rankers.llm_likelihood", "LikelihoodRanker"),
}

__all__ = [
    "CLASSICAL_RANKER_NAMES",
    "LEARNED_RANKER_NAMES",
    "LLM_RANKER_NAMES",
    "RANKER_NAMES",
    "Candidate",
    "HistoryItem",
    "ItemStats",
    "RankRequest",
    "RankResult",
    "Ranker",
    "UnknownRankerError",
    "get_ranker",
    "is_learned_ranker",
    "is_llm_ranker",
    "order_by_scores",
]


class UnknownRankerError(ValueError):
    """A ranker name that is not in RANKER_NAMES."""


def is_llm_ranker(name: str) -> bool:
    return name in LLM_RANKER_NAMES


def is_learned_ranker(name: str) -> bool:
    """A trained ranker: it orders every merged candidate (up to RECSYS_RETRIEVE_K), not only the window."""
    return name in LEARNED_RANKER_NAMES


def get_ranker(
    name: str,
    *,
    settings: Settings,
    stats: ItemStats | None = None,
    model=None,
) -> Ranker:
    """The ranker called `name`. LLM rankers (and `learned-llm`) use `model` or load (once) the configured
    one; `popularity` and `copurchase` need `stats`; the learned rankers raise ModelFileError without a
    usable model file."""
    if name == "retrieval":
        from recsys.rankers.classical import RetrievalRanker

        return RetrievalRanker()
    if name in ("popularity", "copurchase"):
        if stats is None:
            raise ValueError(f"ranker {name!r} needs item statistics (stats=...)")
        from recsys.rankers.classical import CopurchaseRanker, PopularityRanker

        return PopularityRanker(stats) if name == "popularity" else CopurchaseRanker(stats)
    if name in _LLM_RANKER_CLASSES:
        if model is None:
            from recsys.llm.loading import load_model

            model = load_model(settings)
        module_name, class_name = _LLM_RANKER_CLASSES[name]
        ranker_class = getattr(importlib.import_module(module_name), class_name)
        return ranker_class(model, settings)
    if name in LEARNED_RANKER_NAMES:
        from recsys.rankers.learned import LearnedRanker

        return LearnedRanker(settings, name, llm_model=model)
    raise UnknownRankerError(f"unknown ranker {name!r}; choose one of: {', '.join(RANKER_NAMES)}")
