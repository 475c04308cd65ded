"""Discover, for a batch of requests: profile → LLM ideas → one vector search per idea → grouped result.

1. profile: each customer's country and most recent purchases (one statement each for the batch);
   a customer the shop does not know gets the profile-free prompt, flagged;
2. ideas: one greedy generation for the whole batch from the few-shot prompt, read back by the
   tolerant parser (an unusable answer becomes the need itself as one idea, flagged);
3. embed every idea of the batch in one encoder pass (descriptions already seen come from the
   query-vector cache);
4. search: POOL_PER_IDEA nearest products per idea in one SQL statement (non-products never
   come back; what the customer bought is left out inside the index scan when asked);
5. group: a product found by several ideas stays only with the idea it is most similar to;
   each group shows SHOWN_PER_GROUP products and keeps the rest, best first, as extras, from
   which a purchased product is replaced (recsys.feedback).

Every product in a result comes from the catalog search, never from the model's text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text

from recsys.catalog.embedding import encode_queries
from recsys.catalog.history import recent_histories
from recsys.catalog.retrieval import search_many
from recsys.config import Settings
from recsys.discover.parse import ParsedIdeas, parse_ideas
from recsys.discover.prompt import (
    DISCOVER_PROMPT_VERSION,
    FIRST_IDEA,
    PROFILE_PURCHASES,
    DiscoverCase,
    answer_lines_budget,
    discover_prompt,
    make_case,
)
from recsys.discover.request import DiscoverRequest
from recsys.platform.db import get_engine

log = logging.getLogger(__name__)

KIND = "discover"
POOL_PER_IDEA = 25
SHOWN_PER_GROUP = 3
MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM = 4  # Gemma 3 270M wrote the same idea three times in 6 of 10 answers without it, 0 of 5 with it
DESCRIPTION_TOKENS = 24
NEED_TOKENS = 128


@dataclass
class _Profile:
    known: bool
    country: str | None
    purchases: list[dict]


def model_for(settings: Settings):
    """The process-wide LLM of these settings (loaded once; the worker loads it before its first job)."""
    from recsys.llm.loading import load_model

    return load_model(settings)


def discover(request: DiscoverRequest, settings: Settings, model=None) -> dict:
    """One discover result; see `discover_batch`."""
    return discover_batch([request], settings, model=model)[0]


def discover_batch(requests: Sequence[DiscoverRequest], settings: Settings, model=None) -> list[dict]:
    """Grouped discover results, one per request (validated when built), in input order. `model` overrides the
    configured LLM."""
    if not requests:
        return []
    count = len(requests)
    loaded = model or model_for(settings)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    profiles = _profiles(sorted({r.customer_id for r in requests if r.customer_id is not None}), settings)
    timings["profile_ms"] = _elapsed_ms(started) / count

    started = time.perf_counter()
    cases = [_case(request, profiles.get(request.customer_id), loaded) for request in requests]
    generations, prompt_tokens = _generate(loaded, cases)
    timings["generate_ms"] = _elapsed_ms(started) / count

    started = time.perf_counter()
    parsed = [parse_ideas(FIRST_IDEA + g.text, case.need) for case, g in zip(cases, generations, strict=True)]
    timings["parse_ms"] = _elapsed_ms(started) / count

    started = time.perf_counter()
    descriptions = [idea.description for p in parsed for idea in p.ideas]
    vectors = encode_queries(descriptions, settings)
    timings["embed_ms"] = _elapsed_ms(started) / count

    started = time.perf_counter()
    excludes = [r.customer_id if r.exclude_purchased else None for r, p in zip(requests, parsed, strict=True)
                for _ in p.ideas]
    hits = search_many(vectors, POOL_PER_IDEA, settings, exclude_customers=excludes)
    timings["search_ms"] = _elapsed_ms(started) / count

    results = []
    offset = 0
    for request, generation, tokens, answer in zip(requests, generations, prompt_tokens, parsed, strict=True):
        idea_hits = hits[offset:offset + len(answer.ideas)]
        offset += len(answer.ideas)
        started = time.perf_counter()
        groups = group_products(answer, idea_hits)
        request_timings = {**timings, "group_ms": _elapsed_ms(started)}
        profile = profiles.get(request.customer_id) if request.customer_id is not None else None
        info = {"prompt_tokens": tokens, "generated_tokens": generation.new_tokens}
        results.append(
            _result(request, profile, answer, groups, generation.text, info, count, request_timings, settings)
        )
    return results


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _profiles(customer_ids: Sequence[int], settings: Settings) -> dict[int, _Profile]:
    """Country and most recent purchases of each known customer; unknown ones are left out."""
    if not customer_ids:
        return {}
    with get_engine(settings).connect() as conn:
        countries = dict(
            conn.execute(
                text("SELECT customer_id, country FROM customers WHERE customer_id = ANY(:ids)"),
                {"ids": list(customer_ids)},
            ).all()
        )
    histories = recent_histories(list(countries), PROFILE_PURCHASES, settings) if countries else {}
    return {
        customer_id: _Profile(
            known=True,
            country=country,
            purchases=[{"stock_code": h.stock_code, "description": h.description} for h in histories[customer_id]],
        )
        for customer_id, country in countries.items()
    }


def _case(request: DiscoverRequest, profile: _Profile | None, loaded) -> DiscoverCase:
    """The prompt's view of a request: untrusted texts made prompt-safe and cut to a token budget."""
    from recsys.rankers.llm_common import shortener_for

    shortener = shortener_for(loaded.tokenizer)
    need = shortener.shorten([request.need], NEED_TOKENS)[0][0] or request.need
    if profile is None:
        return make_case(need, None, [])
    purchases = [t for t, _ in shortener.shorten([p["description"] for p in profile.purchases], DESCRIPTION_TOKENS)]
    country = shortener.defuse(profile.country) if profile.country else None
    return make_case(need, country, purchases)


def _generate(loaded, cases: Sequence[DiscoverCase]) -> tuple[list, list[int]]:
    """The model's continuations for the whole batch (one batched greedy generation) and the prompt lengths."""
    from recsys.llm.inference import encode_prompt, generate_greedy

    sequences = [encode_prompt(loaded, discover_prompt(case), chat=False) for case in cases]
    generations = generate_greedy(
        loaded, sequences, max_new_tokens=MAX_NEW_TOKENS, stop_after_lines=answer_lines_budget(), stop_loops=True,
        no_repeat_ngram_size=NO_REPEAT_NGRAM,
    )
    return generations, [len(sequence) for sequence in sequences]


def group_products(answer: ParsedIdeas, idea_hits: Sequence[Sequence]) -> list[dict]:
    """Each product with the idea it is most similar to; per idea the best SHOWN_PER_GROUP shown, the rest extras."""
    claims = sorted(
        ((hit.score, -index, -rank, index, hit) for index, hits in enumerate(idea_hits)
         for rank, hit in enumerate(hits)),
        key=lambda claim: claim[:3],
        reverse=True,
    )
    owner: dict[str, int] = {}
    members: list[list] = [[] for _ in idea_hits]
    for _, _, _, index, hit in claims:
        if hit.stock_code not in owner:
            owner[hit.stock_code] = index
            members[index].append(hit)
    groups = []
    for idea, found in zip(answer.ideas, members, strict=True):
        products = [{"stock_code": h.stock_code, "description": h.description, "score": round(h.score, 4)}
                    for h in found]
        groups.append({
            "idea": idea.as_dict(),
            "items": products[:SHOWN_PER_GROUP],
            "extras": products[SHOWN_PER_GROUP:],
            "replaced": [],
        })
    return groups


def _result(request: DiscoverRequest, profile: _Profile | None, answer: ParsedIdeas, groups: list[dict],
            generated: str, info: dict, batch_size: int, timings: dict[str, float], settings: Settings) -> dict:
    unknown_customer = request.customer_id is not None and profile is None
    notes = []
    if unknown_customer:
        notes.append(f"customer {request.customer_id} is unknown: the prompt has no profile")
    if answer.fallback:
        notes.append("the model's answer held no usable idea: searched for the need itself")
    timings = {**timings, "total_ms": sum(timings.values())}
    return {
        "kind": KIND,
        "request": request.as_dict(),
        "customer_id": request.customer_id,
        "need": request.need,
        "profile": {
            "known": profile is not None,
            "country": profile.country if profile else None,
            "recent_purchases": profile.purchases if profile else [],
        },
        "summary": answer.summary or f"Products for: {request.need}",
        "groups": groups,
        "raw_output": FIRST_IDEA + generated,
        "flags": {
            "fallback": answer.fallback,
            "repaired": answer.repaired,
            "unknown_customer": unknown_customer,
            "profile_free": profile is None,
            "summary_missing": answer.summary is None,
        },
        "problems": answer.problems,
        "notes": notes,
        "model": settings.llm_model,
        "prompt_version": DISCOVER_PROMPT_VERSION,
        "embedding_model": settings.embedding_model,
        "info": {**info, "pool_per_idea": POOL_PER_IDEA, "shown_per_group": SHOWN_PER_GROUP},
        "batch_size": batch_size,
        "timings_ms": {key: round(value, 2) for key, value in timings.items()},
    }


def shown_items(result: dict) -> list[dict]:
    """The products a discover result shows now, group by group."""
    return [item for group in result.get("groups", []) for item in group["items"]]
