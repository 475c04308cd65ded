"""The kinds of job the one job system runs, and how each is read, keyed and run in a batch.

Every kind goes through the same submit → cache → durable row → Celery message → batch claim →
result path; only these steps differ. A worker's batch holds jobs of one kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from recsys.config import Settings
from recsys.platform.models import JOB_KINDS
from recsys.recommend.request import RequestError

RECOMMENDATION, DISCOVER = JOB_KINDS


@dataclass(frozen=True)
class JobKind:
    name: str
    parse: Callable[[dict], object]
    """JSON-like request → validated request object (RequestError on bad input)."""
    cache_key: Callable[[Connection, object, Settings], str]
    run_batch: Callable[[Sequence[object], Settings], list[dict]]
    warm: Callable[[Sequence[object], Settings], None] | None = None
    """Work for requests about to be run that their batch can then skip (their candidates); results unchanged."""
    max_batch: int | None = None
    """At most this many jobs of the kind in one batch, whatever RECSYS_BATCH_SIZE says (None: no cap)."""

    def batch_size(self, settings: Settings) -> int:
        """How many jobs of this kind a worker ranks as one batch."""
        return min(settings.batch_size, self.max_batch or settings.batch_size)


def _parse_recommendation(data: dict):
    from recsys.recommend.request import RecommendationRequest

    return RecommendationRequest.from_dict(data)


def _recommendation_key(conn: Connection, request, settings: Settings) -> str:
    from recsys.recommend.cache import cache_key

    return cache_key(conn, request, settings)


def _recommend(requests: Sequence, settings: Settings) -> list[dict]:
    from recsys.recommend.pipeline import recommend_batch

    return recommend_batch(requests, settings)


def _warm_recommendations(requests: Sequence, settings: Settings) -> None:
    from recsys.recommend.pipeline import prepare_ahead

    prepare_ahead(requests, settings)


def _parse_discover(data: dict):
    from recsys.discover.request import DiscoverRequest

    return DiscoverRequest.from_dict(data)


def _discover_key(conn: Connection, request, settings: Settings) -> str:
    from recsys.discover.cache import cache_key

    return cache_key(conn, request, settings)


def _discover(requests: Sequence, settings: Settings) -> list[dict]:
    from recsys.discover.pipeline import discover_batch

    return discover_batch(requests, settings)


KINDS = {
    RECOMMENDATION: JobKind(RECOMMENDATION, _parse_recommendation, _recommendation_key, _recommend,
                            _warm_recommendations),
    # Generation takes ~13 s a request on a CPU (README, Discover): a batch of 64 would run past the job time
    # limit (600 s for the whole batch), so discover batches stay at 32, the worker's default before it was 64.
    DISCOVER: JobKind(DISCOVER, _parse_discover, _discover_key, _discover, max_batch=32),
}


def job_kind(name: str | None) -> JobKind:
    """The kind called `name`; RequestError for a kind this version does not know."""
    kind = KINDS.get(name or "")
    if kind is None:
        raise RequestError(f"unknown job kind {name!r}; known: {', '.join(KINDS)}")
    return kind
