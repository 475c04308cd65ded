"""The API's response bodies as models: the OpenAPI document's schemas are generated from them.

Views build their bodies as plain dicts (no per-response validation cost); tests validate real
responses against these models, so the document cannot drift from what the API sends.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from recsys.discover.request import DiscoverRequest
from recsys.feedback import FeedbackEvent
from recsys.platform.models import JobStatus
from recsys.recommend.request import RecommendationRequest


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable, e.g. invalid_request")
    message: str = Field(description="what to fix, for a person")


class Error(BaseModel):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


class RecommendationItem(BaseModel):
    rank: int
    stock_code: str
    description: str
    score: float | None = Field(description="the ranker's score; none for rankers that only order")
    retrieval_score: float | None
    explanation: str | None = Field(description="its reasons as one line, when the request asked to explain")
    reasons: list[str] = Field([], description="grounded reasons, best first (with explain)")
    model_reason: str | None = Field(None, description="the LLM's own words for this item (with explain)")


class ProductRef(BaseModel):
    stock_code: str
    description: str


class Candidate(ProductRef):
    retrieval_score: float | None
    sources: dict[str, Any] = Field({}, description="the candidate sources that proposed it, with their evidence")


class RecommendationResult(BaseModel):
    """Everything that explains the answer: request, history, candidates, final order, timings."""

    request: RecommendationRequest = Field(description="the request as served (ranker filled in)")
    customer_id: int | None
    query: str | None
    k: int
    ranker: str
    model: str | None = Field(description="the LLM behind the ranker, if any")
    prompt_version: str | None
    embedding_model: str
    cold_start: bool = Field(description="customer_id has no purchases: ranked without history")
    notes: list[str]
    ranking_note: str | None = Field(None, description="in words, how much of the order the ranker decided itself")
    history: list[ProductRef]
    candidates: list[Candidate]
    ranked_candidates: int = Field(description="how many candidates the ranker ordered")
    items: list[RecommendationItem]
    raw_output: Any = Field(description="the LLM's raw answer, for rankers that generate one")
    flags: dict[str, bool] = Field(description="repaired: output fixed up; fallback: retrieval order used")
    info: dict[str, Any]
    batch_size: int = Field(description="how many requests were ranked together")
    timings_ms: dict[str, float] = Field(description="per stage, and total_ms")


class Submission(BaseModel):
    """The answer to POST /recommendations: a job to poll (202), or the result itself (200)."""

    job_id: uuid.UUID | None = Field(description="none when answered from the result cache")
    status: JobStatus
    cached: bool
    created: bool = Field(description="false when an Idempotency-Key found an earlier job")
    status_url: str | None
    result: RecommendationResult | None = None


class JobTimings(BaseModel):
    created_at: datetime | None
    sent_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    queued_ms: float | None
    run_ms: float | None
    total_ms: float | None


class Job(BaseModel):
    id: uuid.UUID
    kind: str
    status: JobStatus
    request: dict[str, Any] = Field(description="the request as stored")
    result: RecommendationResult | DiscoverResult | None = Field(None, description="once succeeded")
    error: str | None
    attempts: int
    worker: str | None
    idempotency_key: str | None
    cache_key: str | None
    timings: JobTimings


class ServiceCheck(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class WorkerCheck(BaseModel):
    ok: bool
    alive: bool | None = None
    workers: list[dict[str, Any]] = []
    last_seen_seconds: float | None = None
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "warming", "unavailable"] = Field(
        description="ok; degraded: no live worker; warming: this web process is still loading (503); "
                    "unavailable: database or broker down")
    database: ServiceCheck
    broker: ServiceCheck
    worker: WorkerCheck


class Product(BaseModel):
    stock_code: str
    description: str
    price: float | None
    purchase_count: int
    quantity_total: int
    customer_count: int
    is_non_product: bool
    embedded: bool
    embedding_model: str | None


class Hit(ProductRef):
    score: float


class SimilarProducts(BaseModel):
    stock_code: str
    count: int
    items: list[Hit]


class SearchResults(BaseModel):
    query: str
    hybrid: bool
    count: int
    items: list[Hit]


class DiscoverIdea(BaseModel):
    category: str
    description: str = Field(description="an imagined product, in the catalog's style; searched for in the catalog")


class DiscoverItem(ProductRef):
    score: float = Field(description="cosine similarity to its idea")


class ReplacedItem(ProductRef):
    replaced_by: str | None = Field(description="the extra that took its place; none when the group had none left")
    feedback_event_id: int


class DiscoverGroup(BaseModel):
    idea: DiscoverIdea
    items: list[DiscoverItem] = Field(description="shown: the best 3 not shown under another idea")
    extras: list[DiscoverItem] = Field(description="in reserve, best first: the next replaces a purchased item")
    replaced: list[ReplacedItem] = Field(description="items reported purchased, and what replaced each")


class DiscoverProfile(BaseModel):
    known: bool = Field(description="false: no customer, or one the shop does not know (no profile in the prompt)")
    country: str | None
    recent_purchases: list[ProductRef]


class DiscoverResult(BaseModel):
    """Products for a need, grouped by the LLM's ideas; every product comes from the catalog search."""

    kind: Literal["discover"]
    request: DiscoverRequest
    customer_id: int | None
    need: str
    profile: DiscoverProfile
    summary: str
    groups: list[DiscoverGroup]
    raw_output: str = Field(description="the model's answer as generated")
    flags: dict[str, bool] = Field(description="fallback: no usable idea, the need itself was searched; "
                                               "repaired; unknown_customer; profile_free; summary_missing")
    problems: list[str] = Field(description="what the parser had to forgive")
    notes: list[str]
    model: str
    prompt_version: str
    embedding_model: str
    info: dict[str, Any]
    batch_size: int
    timings_ms: dict[str, float] = Field(description="per stage, per request: profile, generate, parse, embed, "
                                                      "search, group, total")


class DiscoverSubmission(BaseModel):
    """The answer to POST /discover: a job to poll (202), or the result itself (200)."""

    job_id: uuid.UUID | None
    status: JobStatus
    cached: bool
    created: bool = Field(description="false when an Idempotency-Key found an earlier job")
    status_url: str | None
    result: DiscoverResult | None = None


class HistoryEntry(ProductRef):
    last_purchased_at: str
    quantity: int
    times_bought: int


class CustomerHistory(BaseModel):
    customer_id: int
    count: int
    items: list[HistoryEntry]


class FeedbackPurchase(BaseModel):
    id: int
    invoice_no: str = Field(description="FB<event id>: a purchase row marked as coming from feedback")
    invoiced_at: str


class FeedbackReplacement(BaseModel):
    group: int = Field(description="index of the discover group")
    idea: DiscoverIdea
    replaced: DiscoverItem
    by: DiscoverItem | None = Field(description="the group's first extra, now shown in its place")


class StoredFeedbackEvent(FeedbackEvent):
    """A feedback event as stored, and what it did."""

    model_config = ConfigDict(strict=False)  # a reply's JSON carries dates and ids as strings
    id: int
    created_at: datetime
    created: bool = Field(description="false: this Idempotency-Key was recorded before; this is its first answer")
    purchase: FeedbackPurchase | None = Field(description="the purchase row a `purchased` event recorded")
    replacement: FeedbackReplacement | None = Field(
        description="on a discover result, the extra that replaced the purchased product")
