"""The four-stage recommendation pipeline: retrieve, filter, rank, order.

1. retrieve candidates from four sources (vector search by the query text or the mean embedding
   of the recent purchases, the customer's repeat purchases, co-purchase partners of the recent
   purchases, recent best sellers), merged and tagged with their sources and evidence
   (`recsys.recommend.candidates`): max(k, `RECSYS_MAX_CANDIDATES`) of them, at most
   `RECSYS_RETRIEVE_K`;
2. filter: non-products always, what the customer already bought when asked (inside the
   candidate statement, so nothing is fetched only to be thrown away);
3. rank the top `RECSYS_MAX_CANDIDATES` with the chosen ranker (a learned ranker, being cheap,
   orders all `RECSYS_RETRIEVE_K`);
4. order: the ranked window first, then (when k is larger) the rest in merged order; cut to k.

Requests are ranked in batches: one `Ranker.rank` call per ranker for a whole batch, which is
what lets a GPU worker see full batches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text

from recsys.catalog.embedding import encode_queries, model_is_loaded
from recsys.catalog.history import HISTORY_ITEMS, recent_histories
from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.platform.process import process_thread
from recsys.rankers import (
    Candidate,
    HistoryItem,
    Ranker,
    RankRequest,
    RankResult,
    get_ranker,
    is_learned_ranker,
    is_llm_ranker,
)
from recsys.rankers.item_stats import DatabaseItemStats
from recsys.rankers.learned import ModelFileError
from recsys.recommend.candidates import (
    CANDIDATES_THREAD,
    PARALLEL_FROM,
    CandidateRequest,
    candidates_batch,
    copurchase_neighbours,
)
from recsys.recommend.explanations import attach_explanations
from recsys.recommend.ordering import final_order
from recsys.recommend.request import RecommendationRequest, RequestError

log = logging.getLogger(__name__)

_rankers: dict[tuple, Ranker] = {}
_rankers_lock = threading.Lock()


def ranker_for(name: str, settings: Settings) -> Ranker:
    """One ranker object per name and settings per process (LLM rankers hold the loaded model)."""
    key = (name, settings)
    with _rankers_lock:
        ranker = _rankers.get(key)
        if ranker is None:
            try:
                ranker = get_ranker(name, settings=settings, stats=DatabaseItemStats(settings))
            except ModelFileError as exc:
                raise RequestError(str(exc)) from exc
            _rankers[key] = ranker
        return ranker


def model_identity(ranker_name: str, settings: Settings) -> tuple[str | None, str | None]:
    """(model, prompt version) that shape a ranker's answer; None for classical rankers.

    A learned ranker's model is its model file's version (`learned:<hash>`), so a retrain misses
    the result cache; without a usable model file this is a RequestError naming the command to run.
    """
    if is_learned_ranker(ranker_name):
        from recsys.rankers.learned import model_version

        try:
            model = f"{ranker_name}:{model_version(settings, ranker_name)}"
        except ModelFileError as exc:
            raise RequestError(str(exc)) from exc
        if ranker_name == "learned":
            return model, None
        from recsys.llm.prompts import PROMPT_VERSION

        return f"{model}+{settings.llm_model}", PROMPT_VERSION
    if not is_llm_ranker(ranker_name):
        return None, None
    from recsys.llm.prompts import PROMPT_VERSION

    return settings.llm_model, PROMPT_VERSION


def _read_histories(customers: list[int], settings: Settings) -> tuple[dict, float]:
    """The customers' recent purchases and the seconds that took; then the partners the candidate stage
    will want for them are read into its per-process cache, off the batch's critical path."""
    started = time.perf_counter()
    histories = recent_histories(customers, HISTORY_ITEMS, settings)
    seconds = time.perf_counter() - started
    copurchase_neighbours(settings, sorted({h.stock_code for bought in histories.values() for h in bought}))
    return histories, seconds


@dataclass
class _Prepared:
    request: RecommendationRequest
    history: list[HistoryItem]
    candidates: list[Candidate]
    notes: list[str]
    timings: dict[str, float]
    cold_start: bool


def recommend(request: RecommendationRequest, settings: Settings, ranker: Ranker | None = None) -> dict:
    """One recommendation; see `recommend_batch`."""
    return recommend_batch([request], settings, ranker=ranker)[0]


def recommend_batch(
    requests: Sequence[RecommendationRequest], settings: Settings, ranker: Ranker | None = None
) -> list[dict]:
    """Recommendations for many requests, ranked one batch per ranker. Results keep the input order.

    `ranker` overrides the registry (the evaluation and tests pass their own).
    """
    requests = [r.with_defaults(settings) for r in requests]
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.ranker, []).append(index)
    actives = {name: ranker or ranker_for(name, settings) for name in groups}
    rank_all = {name: getattr(active, "ranks_all_candidates", False) for name, active in actives.items()}
    prepared = _prepare_batch(requests, settings, [rank_all[r.ranker] for r in requests])
    results: list[dict | None] = [None] * len(requests)
    for name, indexes in groups.items():
        active = actives[name]
        window = settings.retrieve_k if rank_all[name] else settings.max_candidates
        batch = [
            RankRequest(
                candidates=prepared[i].candidates[:window],
                history=prepared[i].history,
                query=prepared[i].request.query,
                customer_id=prepared[i].request.customer_id,
                explain=prepared[i].request.explain,
            )
            for i in indexes
        ]
        started = time.perf_counter()
        ranked = active.rank(batch) if batch else []
        rank_ms = (time.perf_counter() - started) * 1000
        model, prompt_version = model_identity(getattr(ranker, "name", name) if ranker else name, settings)
        for i, rank_request, outcome in zip(indexes, batch, ranked, strict=True):
            prepared[i].timings["rank_ms"] = rank_ms / len(indexes)
            results[i] = _result(
                prepared[i], rank_request, outcome, name, model, prompt_version, len(indexes), settings
            )
    attach_explanations(results, settings)
    return results


@dataclass
class _Ahead:
    settings: Settings
    marker: tuple
    prepared: dict[tuple[str, bool], _Prepared]
    made_at: float  # time.monotonic()


# A worker's next batch follows within milliseconds; stages kept longer (an idle worker) are not used, whatever
# the marker says: a change it does not see (purchases edited in place) cannot reach a later batch.
AHEAD_KEPT_SECONDS = 10.0


_ahead: _Ahead | None = None
_ahead_lock = threading.Lock()  # held while stages are prepared ahead; a batch waits for them
_DATA_MARKER = text(
    """
    SELECT (SELECT max(id) FROM purchases), (SELECT version FROM catalog_version),
           (SELECT max(id) FROM ingest_runs), (SELECT max(finished_at) FROM ingest_runs)
    """
)


def prepare_ahead(requests: Sequence[RecommendationRequest], settings: Settings) -> None:
    """Run stages 1–2 (histories, query vectors, candidates) for requests about to be ranked and keep them for
    the next batch of this process that holds the same requests (`_prepare_batch`), as a batch would run them.

    A worker does it in a thread while it records its last batch, stores the answers and takes the next
    message: Postgres runs the next batch's statements and the encoder its queries while the process's own
    work is mostly Python and the broker. Kept with the data marker read before (`_DATA_MARKER`), they are
    used only if purchases, the catalog and the ingest runs did not change since, and only by the next batch,
    within `AHEAD_KEPT_SECONDS`: each request's stages do not depend on the other requests of its pass, so the
    answer is the same. A request that cannot be prepared (no purchases, no query) leaves the queries encoded
    and the rest to its batch. Only with the embedding model this process holds already: a head start never
    loads one.
    """
    global _ahead
    if not model_is_loaded(settings):
        return
    requests = [r.with_defaults(settings) for r in requests]
    with _ahead_lock:
        _ahead = None
        try:
            rank_all = [getattr(ranker_for(r.ranker, settings), "ranks_all_candidates", False) for r in requests]
            marker = _data_marker(settings)
            prepared = _prepare(requests, settings, rank_all)
        except RequestError:
            _encode(requests, settings, light=False)
            return
        keys = [_ahead_key(request, whole) for request, whole in zip(requests, rank_all, strict=True)]
        _ahead = _Ahead(settings, marker, dict(zip(keys, prepared, strict=True)), time.monotonic())


def _data_marker(settings: Settings) -> tuple:
    """What moves when the data stages 1–2 read changes: purchases added, products or embeddings changed (the
    catalog version's trigger), an ingest started or ended (it refreshes the co-purchase view)."""
    with get_engine(settings).connect() as conn:
        return tuple(conn.execute(_DATA_MARKER).one())


def _ahead_key(request: RecommendationRequest, rank_all: bool) -> tuple[str, bool]:
    return json.dumps(request.as_dict(), sort_keys=True), rank_all


def _take_ahead(settings: Settings) -> dict[tuple[str, bool], _Prepared]:
    """The stages prepared ahead, once (waiting for a preparation under way); none when the data changed since."""
    global _ahead
    if _ahead is None and not _ahead_lock.locked():
        return {}
    with _ahead_lock:
        ahead, _ahead = _ahead, None
    if (ahead is None or ahead.settings != settings or time.monotonic() - ahead.made_at > AHEAD_KEPT_SECONDS
            or _data_marker(settings) != ahead.marker):
        return {}
    return ahead.prepared


def _prepare_batch(
    requests: Sequence[RecommendationRequest], settings: Settings, rank_all: Sequence[bool]
) -> list[_Prepared]:
    """`_prepare`, taking what `prepare_ahead` prepared for these requests and running the stages for the rest."""
    ahead = _take_ahead(settings)
    ready = [ahead.pop(_ahead_key(r, whole), None) for r, whole in zip(requests, rank_all, strict=True)]
    rest = [i for i, found in enumerate(ready) if found is None]
    if rest:
        fresh = _prepare([requests[i] for i in rest], settings, [rank_all[i] for i in rest])
        for i, found in zip(rest, fresh, strict=True):
            ready[i] = found
    return ready


WARM_UP_REQUESTS = 2 * PARALLEL_FROM
_WARM_UP_CUSTOMERS = text(
    "SELECT customer_id FROM customers WHERE purchase_count > 0 ORDER BY last_purchase_at DESC, customer_id LIMIT :n"
)
_WARM_UP_QUERIES = text(
    "SELECT description FROM products WHERE NOT is_non_product AND embedding IS NOT NULL "
    "ORDER BY stock_code LIMIT :n"
)


def warm_up(settings: Settings) -> None:
    """Run stages 1–2 once for a batch made from the catalog (the customers who bought last, product
    descriptions as queries) and drop the answer, so a worker's first real batch does not pay for what a
    process does once: its first query-encoder pass in the configured precision, the statements' plans on
    both connections of a split batch, the index pages: a fresh worker's first job, sent alone, goes from
    submitted to succeeded in 79-80 ms instead of 140-244 (medians of three, `bench/jobs.py --first-jobs 3`).
    Reads only; the query vectors it caches are the ones these texts would get in any batch. Only with the
    embedding model this process holds already.
    """
    if not model_is_loaded(settings):
        return
    with get_engine(settings).connect() as conn:
        customers = conn.execute(_WARM_UP_CUSTOMERS, {"n": WARM_UP_REQUESTS}).scalars().all()
        queries = conn.execute(_WARM_UP_QUERIES, {"n": WARM_UP_REQUESTS}).scalars().all()
    requests = [  # a small catalog's few customers come back with other queries
        RecommendationRequest(customer_id=customers[i % len(customers)] if customers else None, query=query)
        for i, query in enumerate(queries)
    ]
    if requests:
        started = time.perf_counter()
        _prepare(requests, settings, [False] * len(requests))
        log.info("ran a batch's first stages once for %d requests in %.0f ms", len(requests),
                 (time.perf_counter() - started) * 1000)


def _encode(requests: Sequence[RecommendationRequest], settings: Settings, *, light: bool) -> dict:
    """The requests' query vectors by query text. `light`: the batch's only query (`recsys recommend`, a lone
    job) goes through the light encoder when this process has not loaded the torch model."""
    queries = [r.query for r in requests if r.query]
    if not queries:
        return {}
    return dict(zip(queries, encode_queries(queries, settings, light=light), strict=True))


def _prepare(
    requests: Sequence[RecommendationRequest], settings: Settings, rank_all: Sequence[bool]
) -> list[_Prepared]:
    """Stages 1–2 for the whole batch: histories, query vectors and filtered candidates
    (`RECSYS_RETRIEVE_K` of them where `rank_all`, for a ranker that orders every candidate).

    Each stage is one SQL statement (or one encoder pass) for many requests together, so a batch
    of 32 costs about as many round trips as a single request. A batch of `PARALLEL_FROM` or more
    is prepared in two halves, pipelined: the first half's candidate statement runs in Postgres
    while this process encodes the second half's queries, and the second half's statement while
    the first half's rows are merged. Each request's vector and candidates do not depend on the
    other requests of its pass, so the answer is the same. Stage times are per request and overlap.
    """
    count = len(requests)
    customers = sorted({r.customer_id for r in requests if r.customer_id is not None})
    halves = [requests] if count < PARALLEL_FROM else [requests[: (count + 1) // 2], requests[(count + 1) // 2:]]
    # The histories (and their co-purchase partners) are read while the queries are encoded: the encoder
    # computes and Postgres reads at once.
    reading = process_thread("recsys-histories").submit(_read_histories, customers, settings)
    light = sum(1 for r in requests if r.query) == 1
    t0 = time.perf_counter()
    try:
        query_vectors = _encode(halves[0], settings, light=light)
        embed_seconds = time.perf_counter() - t0
    finally:
        histories, history_seconds = reading.result()

    for request in requests:
        if not request.query and not histories.get(request.customer_id):
            raise RequestError(f"customer {request.customer_id} has no purchases and the request has no query text")

    wanted = [
        settings.retrieve_k if whole else min(max(r.k, settings.max_candidates), settings.retrieve_k)
        for r, whole in zip(requests, rank_all, strict=True)
    ]
    recent = {customer: [h.stock_code for h in bought] for customer, bought in histories.items()}

    def candidates_of(half: Sequence[RecommendationRequest], vectors: dict) -> list:
        return candidates_batch(
            [CandidateRequest(r.customer_id, vectors.get(r.query) if r.query else None, r.exclude_purchased, r.query)
             for r in half],
            settings, limit=max(wanted), recent=recent, split=False,  # the halves are the split
        )

    t0 = time.perf_counter()
    second_encoding = 0.0
    if len(halves) == 1:
        found = candidates_of(requests, query_vectors)
    else:
        first = process_thread(CANDIDATES_THREAD).submit(candidates_of, halves[0], query_vectors)
        try:
            t1 = time.perf_counter()
            later_vectors = _encode(halves[1], settings, light=light)
            second_encoding = time.perf_counter() - t1
            later = candidates_of(halves[1], later_vectors)
        finally:
            found = first.result()
        found += later
    retrieve_ms = (time.perf_counter() - t0 - second_encoding) * 1000 / count
    embed_ms = (embed_seconds + second_encoding) * 1000 / count
    history_ms = history_seconds * 1000 / count

    prepared = []
    for request, candidates, fetched in zip(requests, found, wanted, strict=True):
        bought = histories.get(request.customer_id, []) if request.customer_id is not None else []
        notes: list[str] = []
        if candidates.cold_start:
            notes.append(f"customer {request.customer_id} has no purchases: ranked without history, "
                         "best sellers among the candidates")
        if not request.query:
            notes.append("no query text: searched with the mean embedding of the recent purchases")
        prepared.append(
            _Prepared(
                request,
                [HistoryItem(h.stock_code, h.description) for h in bought],
                candidates.candidates[:fetched],
                notes,
                {"history_ms": history_ms, "embed_ms": embed_ms, "retrieve_ms": retrieve_ms},
                candidates.cold_start,
            )
        )
    return prepared


def _result(
    prepared: _Prepared,
    rank_request: RankRequest,
    outcome: RankResult,
    ranker_name: str,
    model: str | None,
    prompt_version: str | None,
    batch_size: int,
    settings: Settings,
) -> dict:
    """Stage 4: order, cut to k, and record everything that explains the answer."""
    request = prepared.request
    by_code = {c.stock_code: c for c in prepared.candidates}
    order = final_order(
        outcome.order, (c.stock_code for c in rank_request.candidates), [c.stock_code for c in prepared.candidates]
    )
    explanations = outcome.explanations or {}
    items = [
        {
            "rank": position,
            "stock_code": code,
            "description": by_code[code].description,
            "score": outcome.scores.get(code),
            "retrieval_score": by_code[code].retrieval_score,
            "explanation": explanations.get(code),
        }
        for position, code in enumerate(order[: request.k], 1)
    ]
    timings = dict(prepared.timings)
    timings["total_ms"] = sum(timings.values())
    return {
        "request": request.as_dict(),
        "customer_id": request.customer_id,
        "query": request.query,
        "k": request.k,
        "ranker": ranker_name,
        "model": model,
        "prompt_version": prompt_version,
        "embedding_model": settings.embedding_model,
        "cold_start": prepared.cold_start,
        "notes": prepared.notes,
        "history": [{"stock_code": h.stock_code, "description": h.description} for h in prepared.history],
        "candidates": [
            {"stock_code": c.stock_code, "description": c.description, "retrieval_score": c.retrieval_score,
             "sources": dict(c.sources)}
            for c in prepared.candidates
        ],
        "ranked_candidates": len(rank_request.candidates),
        "items": items,
        "raw_output": outcome.raw_output,
        "flags": {"repaired": outcome.repaired, "fallback": outcome.fallback},
        "info": outcome.info,
        "batch_size": batch_size,
        "timings_ms": {key: round(value, 2) for key, value in timings.items()},
    }
