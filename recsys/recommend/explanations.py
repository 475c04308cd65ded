"""Grounded explanations: short reasons for each recommended item, from evidence the database holds.

Every reason states a fact that can be checked — "you bought this 3 times, last on 2011-11-29",
"bought together with WHITE LOVEBIRD LANTERN in 12 orders", "like your WHITE LOVEBIRD LANTERN",
"a best seller this month", "matches 'bag charm'" — and the first one is what drove the item's
rank under the ranker that ordered it (co-purchase counts for `copurchase`, customer counts for
`popularity`, the query or the history for `retrieval`). An LLM ranker's own reason is kept apart,
as the model's words, and only for the items it wrote one for. When an LLM ranker fell back or
had its output repaired, `ranking_note` says in words how much of the order the model decided.

The evidence for a whole batch is read in one SQL statement; the month's best sellers, which need
every purchase of the last 30 days, are read once per process every 10 minutes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine

MAX_REASONS = 3
# Below this cosine similarity a history item is not "like" the candidate in any useful sense.
LIKE_SIMILARITY = 0.5
# "A best seller this month": among the most bought products (by customers) in the 30 days
# before the newest purchase on record (the data's own "now", not the wall clock).
MONTH_DAYS = 30
MONTH_TOP = 50
_WORD = re.compile(r"[a-z0-9]+")

EVIDENCE_SQL = text(
    """
    WITH cand AS (
        SELECT * FROM unnest(CAST(:c_req AS int[]), CAST(:c_customer AS bigint[]), CAST(:c_code AS text[]))
            AS t(req, customer_id, stock_code)
    ), hist AS (
        SELECT * FROM unnest(CAST(:h_req AS int[]), CAST(:h_code AS text[])) AS t(req, stock_code)
    ), ranked AS (
        SELECT stock_code, rank() OVER (ORDER BY customer_count DESC) AS popularity_rank
        FROM products WHERE NOT is_non_product
    )
    SELECT c.req, c.stock_code, p.customer_count, k.popularity_rank,
           r.times, r.last_at,
           t.with_description, t.invoices,
           a.like_description, a.similarity
    FROM cand c
    JOIN products p ON p.stock_code = c.stock_code
    LEFT JOIN ranked k ON k.stock_code = c.stock_code
    LEFT JOIN LATERAL (
        SELECT count(DISTINCT pu.invoice_no) AS times, max(pu.invoiced_at) AS last_at
        FROM purchases pu WHERE pu.customer_id = c.customer_id AND pu.stock_code = c.stock_code
    ) r ON c.customer_id IS NOT NULL
    LEFT JOIN LATERAL (
        SELECT hp.description AS with_description, cp.invoices
        FROM hist h
        JOIN copurchase cp ON cp.stock_code = h.stock_code AND cp.other_stock_code = c.stock_code
        JOIN products hp ON hp.stock_code = h.stock_code
        WHERE h.req = c.req
        ORDER BY cp.invoices DESC, h.stock_code LIMIT 1
    ) t ON true
    LEFT JOIN LATERAL (
        SELECT hp.description AS like_description, 1 - (hp.embedding <=> p.embedding) AS similarity
        FROM hist h JOIN products hp ON hp.stock_code = h.stock_code
        WHERE h.req = c.req AND h.stock_code <> c.stock_code AND hp.embedding IS NOT NULL
        ORDER BY hp.embedding <=> p.embedding, h.stock_code LIMIT 1
    ) a ON p.embedding IS NOT NULL
    """
)

# Best sellers of the month need every purchase of the last 30 days (0.6-0.9 s on the full data at load
# average 16), so each process keeps them for a while instead of reading them with every batch.
MONTH_SQL = text(
    """
    WITH newest AS (SELECT max(invoiced_at) AS at FROM purchases)
    SELECT pu.stock_code, count(DISTINCT pu.customer_id) AS customers,
           rank() OVER (ORDER BY count(DISTINCT pu.customer_id) DESC) AS month_rank, min(newest.at) AS month_end
    FROM purchases pu
    JOIN products pr ON pr.stock_code = pu.stock_code AND NOT pr.is_non_product
    CROSS JOIN newest
    WHERE pu.invoiced_at > newest.at - make_interval(days => :month_days)
    GROUP BY pu.stock_code
    ORDER BY month_rank
    LIMIT :top
    """
)
MONTH_KEPT_SECONDS = 600
_month: dict[str, tuple[float, dict[str, tuple[int, int, datetime]]]] = {}
_month_lock = threading.Lock()


def month_best_sellers(settings: Settings) -> dict[str, tuple[int, int, datetime]]:
    """stock code → (customers, rank, end of the month) for the MONTH_TOP best sellers; kept MONTH_KEPT_SECONDS."""
    key = get_engine(settings).url.render_as_string()
    with _month_lock:
        kept = _month.get(key)
        if kept is not None and time.monotonic() - kept[0] < MONTH_KEPT_SECONDS:
            return kept[1]
    with get_engine(settings).connect() as conn:
        rows = conn.execute(MONTH_SQL, {"month_days": MONTH_DAYS, "top": MONTH_TOP}).all()
    sellers = {row.stock_code: (row.customers, row.month_rank, row.month_end) for row in rows}
    with _month_lock:
        _month[key] = (time.monotonic(), sellers)
    return sellers


@dataclass(frozen=True)
class Evidence:
    """What the database says about one candidate for one request."""

    customers: int = 0
    popularity_rank: int | None = None
    times_bought: int = 0
    last_bought: datetime | None = None
    together_with: str | None = None
    together_invoices: int = 0
    like: str | None = None
    like_similarity: float | None = None
    month_customers: int = 0
    month_rank: int | None = None
    month_end: datetime | None = None


def read_evidence(results: Sequence[dict], settings: Settings) -> dict[tuple[int, str], Evidence]:
    """Evidence for every item of every result, keyed by (result index, stock code); one statement."""
    c_req, c_customer, c_code, h_req, h_code = [], [], [], [], []
    for index, result in enumerate(results):
        for item in result.get("items") or []:
            c_req.append(index)
            c_customer.append(result.get("customer_id"))
            c_code.append(item["stock_code"])
        for item in result.get("history") or []:
            h_req.append(index)
            h_code.append(item["stock_code"])
    if not c_code:
        return {}
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            EVIDENCE_SQL,
            {"c_req": c_req, "c_customer": c_customer, "c_code": c_code, "h_req": h_req, "h_code": h_code},
        ).all()
    month = month_best_sellers(settings)
    return {
        (row.req, row.stock_code): Evidence(
            customers=row.customer_count or 0,
            popularity_rank=row.popularity_rank,
            times_bought=row.times or 0,
            last_bought=row.last_at,
            together_with=row.with_description,
            together_invoices=row.invoices or 0,
            like=row.like_description,
            like_similarity=float(row.similarity) if row.similarity is not None else None,
            month_customers=month.get(row.stock_code, (0, None, None))[0],
            month_rank=month.get(row.stock_code, (0, None, None))[1],
            month_end=month.get(row.stock_code, (0, None, None))[2],
        )
        for row in rows
    }


def _count(n: int, one: str, many: str) -> str:
    return one if n == 1 else f"{n:,} {many}"


def _words(value: str) -> set[str]:
    return set(_WORD.findall(value.casefold()))


def matches_query(query: str | None, description: str) -> bool:
    """Every word of the query (singular or plural) is in the description."""
    if not query:
        return False
    wanted = _words(query)
    have = _words(description)
    have |= {word[:-1] for word in have if word.endswith("s")}
    return bool(wanted) and all(word in have or word.rstrip("s") in have for word in wanted)


def _reasons_by_kind(item: dict, evidence: Evidence, query: str | None) -> dict[str, str]:
    """Every reason the evidence supports for this item, by kind."""
    reasons: dict[str, str] = {}
    if evidence.times_bought and evidence.last_bought:
        last = f"{evidence.last_bought:%Y-%m-%d}"
        reasons["repeat"] = (
            f"you bought this once, on {last}" if evidence.times_bought == 1
            else f"you bought this {evidence.times_bought:,} times, last on {last}"
        )
    if evidence.together_with and evidence.together_invoices:
        reasons["copurchase"] = (
            f"bought together with {evidence.together_with} in {evidence.together_invoices:,} orders"
        )
    if evidence.like and evidence.like_similarity is not None and evidence.like_similarity >= LIKE_SIMILARITY:
        reasons["like"] = f"like your {evidence.like}"
    if evidence.month_rank is not None and evidence.month_rank <= MONTH_TOP and evidence.month_end:
        reasons["month"] = (
            f"a best seller this month (#{evidence.month_rank} by customers in the {MONTH_DAYS} days "
            f"to {evidence.month_end:%Y-%m-%d})"
        )
    if evidence.customers:
        rank = f", #{evidence.popularity_rank:,} in the catalog" if evidence.popularity_rank else ""
        reasons["popular"] = f"bought by {_count(evidence.customers, 'one customer', 'customers')}{rank}"
    if query:
        if matches_query(query, item.get("description") or ""):
            reasons["query"] = f"matches '{query}'"
        elif item.get("retrieval_score") is not None:
            reasons["query"] = f"close to '{query}' in meaning (similarity {item['retrieval_score']:.2f})"
    elif "like" not in reasons and item.get("retrieval_score") is not None:
        reasons["query"] = "close to what you bought recently"
    return reasons


# What drove the rank under each ranker, first; then the evidence a shopper finds most telling.
DRIVERS = {
    "retrieval": ("query", "like"),
    "popularity": ("popular",),
    "copurchase": ("copurchase",),
}
SUPPORTING = ("repeat", "copurchase", "like", "month", "query", "popular")


def choose_reasons(ranker: str, item: dict, evidence: Evidence, query: str | None, fell_back: bool) -> list[str]:
    """At most MAX_REASONS reasons, the one that decided the item's place first.

    A ranker that fell back to retrieval order was decided by the query (or the history vector).
    """
    available = _reasons_by_kind(item, evidence, query)
    drivers = DRIVERS["retrieval"] if fell_back else DRIVERS.get(ranker, ())
    kinds = [kind for kind in drivers if kind in available]
    kinds += [kind for kind in SUPPORTING if kind in available and kind not in kinds]
    if ranker != "popularity" and "month" in kinds and "popular" in kinds:
        kinds.remove("popular")
    return [available[kind] for kind in kinds[:MAX_REASONS]]


def ranking_note(result: dict) -> str | None:
    """In words: how much of the order an LLM ranker (or the co-purchase ranker) decided itself."""
    flags = result.get("flags") or {}
    info = result.get("info") or {}
    ranker = result.get("ranker")
    ranked = info.get("candidates_ranked", result.get("ranked_candidates") or 0)
    if not (flags.get("fallback") or flags.get("repaired")):
        return None
    if ranker == "copurchase":
        return ("None of the candidates was bought together with this customer's recent purchases, "
                "so they are in retrieval order.")
    if ranker == "popularity":
        return "No candidate has any purchases on record, so they are in retrieval order."
    if ranker == "llm-listwise":
        matched = info.get("matched", 0)
        extra = []
        if info.get("unknown_items"):
            extra.append(f"{_count(info['unknown_items'], 'one line', 'lines')} naming no candidate")
        if info.get("duplicates"):
            extra.append(f"{_count(info['duplicates'], 'one repeat', 'repeats')}")
        wrote = f" Dropped from its answer: {' and '.join(extra)}." if extra else ""
        if flags.get("fallback") or not matched:
            return f"The model's answer named none of the {ranked} candidates, so they are in retrieval order.{wrote}"
        return (f"The model placed {matched} of {ranked} candidates; the other {ranked - matched} follow "
                f"in retrieval order.{wrote}")
    if ranker == "llm-pointwise":
        failures = info.get("parse_failures", 0)
        if flags.get("fallback"):
            return (f"The model gave no usable probability for any of the {ranked} candidates, "
                    "so they are in retrieval order.")
        return (f"The model gave no usable probability for {failures} of {ranked} candidates; those scored 0 "
                "and follow the others in retrieval order.")
    if flags.get("fallback"):
        return f"{ranker} could not rank these candidates, so they are in retrieval order."
    return f"{ranker}'s output had to be repaired before it could be used."


def attach_explanations(results: Sequence[dict], settings: Settings) -> None:
    """Give each item of each result that asked for explanations its reasons, in place.

    Every result gets `ranking_note` (None when the ranker decided the whole order itself). Items of
    results that asked (`request.explain`) get `reasons` (grounded, best first), `explanation` (the
    reasons as one line) and `model_reason` (the LLM's own words for that item, or None).
    """
    wanted = [result for result in results if (result.get("request") or {}).get("explain")]
    started = time.perf_counter()
    evidence = read_evidence(wanted, settings) if wanted else {}
    if wanted:
        share_ms = (time.perf_counter() - started) * 1000 / len(wanted)
        for result in wanted:
            timings = result.setdefault("timings_ms", {})
            timings["explain_ms"] = round(share_ms, 2)
            if "total_ms" in timings:
                timings["total_ms"] = round(timings["total_ms"] + share_ms, 2)
    for result in results:
        note = ranking_note(result)
        result["ranking_note"] = note
        if note and note not in result.setdefault("notes", []):
            result["notes"].append(note)
    for index, result in enumerate(wanted):
        fell_back = bool((result.get("flags") or {}).get("fallback"))
        window = result.get("ranked_candidates") or 0
        for item in result.get("items") or []:
            # Items past the ranked window follow in retrieval order whatever the ranker.
            past_window = bool(window) and item.get("rank", 0) > window
            model_words = item.get("explanation") if result.get("model") else None
            found = evidence.get((index, item["stock_code"]), Evidence())
            reasons = choose_reasons(result.get("ranker") or "", item, found, result.get("query"),
                                     fell_back or past_window)
            item["reasons"] = reasons
            item["explanation"] = "; ".join(reasons) or None
            item["model_reason"] = model_words.strip() if isinstance(model_words, str) and model_words.strip() else None
