"""The API's response bodies as models: the OpenAPI document's schemas are generated from them.

Views build their bodies as plain dicts (no per-response validation cost); tests validate real
responses against these models, so the document cannot drift from what the API sends.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    result: RecommendationResult | None = Field(None, description="once succeeded")
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


class HistoryEntry(ProductRef):
    last_purchased_at: str
    quantity: int
    times_bought: int


class CustomerHistory(BaseModel):
    customer_id: int
    count: int
    items: list[HistoryEntry]


class StoredFeedbackEvent(FeedbackEvent):
    """A feedback event as stored."""

    model_config = ConfigDict(strict=False)  # a reply's JSON carries dates and ids as strings
    id: int
    created_at: datetime
