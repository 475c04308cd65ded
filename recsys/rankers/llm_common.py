"""What the four LLM rankers share: shortening the inputs, capping candidates, assembling results.

Each request is cut down to what a prompt can hold: at most `max_candidates` candidates (the
best by retrieval; the rest are appended after the ranked ones, in retrieval order), the most
recent history items, and every text flattened to one line and cut to a few dozen tokens.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from recsys.config import Settings
from recsys.llm.loading import LoadedModel
from recsys.llm.prompts import PROMPT_VERSION, CustomerCase, one_line
from recsys.rankers.base import Candidate, RankRequest, RankResult
from recsys.rankers.common import empty_result, retrieval_order, scores_below

log = logging.getLogger(__name__)

DESCRIPTION_TOKENS = 24
QUERY_TOKENS = 32
HISTORY_ITEMS = 10


@dataclass
class PreparedRequest:
    """A request as the prompts see it: shown candidates, overflow, cleaned texts."""

    request: RankRequest
    shown: list[Candidate]
    overflow: list[Candidate]
    case: CustomerCase
    name_tokens: list[int]

    @property
    def shown_codes(self) -> list[str]:
        return [c.stock_code for c in self.shown]


def control_token_pattern(tokenizer) -> re.Pattern | None:
    """Matches the tokenizer's special and added tokens written out as text ("<start_of_turn>").

    Untrusted text containing them would otherwise be encoded as real control tokens.
    """
    added = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    added = sorted((token for token in added if token.strip()), key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in added)) if added else None


class TextShortener:
    """Makes untrusted text prompt-safe: one line, no control tokens, cut to a token budget.

    Remembers recent answers, since the same catalog descriptions come back all the time.
    """

    def __init__(self, tokenizer, cache_size: int = 50_000) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.control_tokens = control_token_pattern(tokenizer)
        self._cache: dict[tuple[str, int], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def defuse(self, text: str | None) -> str:
        flat = one_line(text)
        if self.control_tokens is not None and "<" in flat:
            flat = one_line(self.control_tokens.sub(" ", flat))
        return flat

    def shorten(self, texts: Sequence[str | None], max_tokens: int) -> list[tuple[str, int]]:
        """(shortened text, token count) per input text."""
        flat = [self.defuse(text) for text in texts]
        with self._lock:
            todo = sorted({text for text in flat if (text, max_tokens) not in self._cache})
            if todo:
                if len(self._cache) + len(todo) > self.cache_size:
                    self._cache.clear()
                encoded = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
                for text, ids in zip(todo, encoded, strict=True):
                    shortened = text
                    if len(ids) > max_tokens:
                        ids = ids[:max_tokens]
                        shortened = one_line(self.tokenizer.decode(ids, skip_special_tokens=True))
                    self._cache[(text, max_tokens)] = (shortened, len(ids))
            return [self._cache[(text, max_tokens)] for text in flat]


_shorteners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_shorteners_lock = threading.Lock()


def shortener_for(tokenizer) -> TextShortener:
    """One shortener per tokenizer, so rankers made per request reuse its set-up and cache."""
    with _shorteners_lock:
        shortener = _shorteners.get(tokenizer)
        if shortener is None:
            shortener = _shorteners[tokenizer] = TextShortener(tokenizer)
        return shortener


class LLMRanker:
    """Base of the LLM rankers: subclasses implement `_rank_prepared` for non-empty requests."""

    name = "llm"
    uses_llm = True
    prompt_version = PROMPT_VERSION

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        self.settings = settings
        self.model = model
        self.max_candidates = max(1, int(self.settings.max_candidates))
        self.shortener = shortener_for(model.tokenizer)

    @property
    def model_name(self) -> str:
        return self.model.name

    def prepare(self, request: RankRequest) -> PreparedRequest:
        candidates = retrieval_order(request.candidates)
        shown, overflow = candidates[: self.max_candidates], candidates[self.max_candidates:]
        names = self.shortener.shorten([c.description for c in shown], DESCRIPTION_TOKENS)
        history = [item.description for item in request.history[:HISTORY_ITEMS]]
        history_texts = [text for text, _ in self.shortener.shorten(history, DESCRIPTION_TOKENS) if text]
        query = self.shortener.shorten([request.query], QUERY_TOKENS)[0][0] if request.query else ""
        case = CustomerCase(
            history=history_texts,
            query=query or None,
            candidates=[text or candidate.stock_code for (text, _), candidate in zip(names, shown, strict=True)],
        )
        return PreparedRequest(
            request=request,
            shown=shown,
            overflow=overflow,
            case=case,
            name_tokens=[count for _, count in names],
        )

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        started = time.perf_counter()
        prepared = [self.prepare(request) for request in requests]
        active = [p for p in prepared if p.shown]
        ranked = iter(self._rank_prepared(active) if active else [])
        results = []
        for item in prepared:
            result = next(ranked) if item.shown else empty_result()
            result.info.update(
                model=self.model_name,
                prompt_version=self.prompt_version,
                candidates_ranked=len(item.shown),
                candidates_appended=len(item.overflow),
                batch_requests=len(requests),
            )
            results.append(result)
        elapsed_ms = (time.perf_counter() - started) * 1000
        for result in results:
            result.info["batch_ms"] = round(elapsed_ms, 1)
        log.debug("%s ranked %d requests in %.0f ms", self.name, len(requests), elapsed_ms)
        return results

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        raise NotImplementedError

    @staticmethod
    def complete(
        item: PreparedRequest,
        order: Sequence[str],
        scores: dict[str, float],
        **fields,
    ) -> RankResult:
        """The result for all candidates: ranked ones in `order`, then the overflow."""
        overflow = [c.stock_code for c in item.overflow]
        all_scores = dict(scores)
        if overflow:
            floor = min(scores.values()) if scores else 0.0
            all_scores.update(scores_below(floor, overflow))
        return RankResult(order=list(order) + overflow, scores=all_scores, **fields)
