"""A recommendation request: its fields, limits and validation, in one place.

The API, the CLI, the Celery `recsys.submit` task and the worker all build requests through
`RecommendationRequest.from_dict`, so a request is checked by the same rules wherever it enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recsys.config import Settings
from recsys.rankers import RANKER_NAMES

MAX_K = 50
MAX_QUERY_CHARS = 500
MAX_IDEMPOTENCY_KEY = 200


class RequestError(ValueError):
    """A request that cannot be served as given; the message says why, for the client."""


@dataclass(frozen=True)
class RecommendationRequest:
    customer_id: int | None
    query: str | None = None
    k: int = 10
    ranker: str | None = None
    explain: bool = False
    exclude_purchased: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> RecommendationRequest:
        """Build and validate from JSON-like input; wrong types become RequestError."""
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise RequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
        customer_id = data.get("customer_id")
        if customer_id is not None and (isinstance(customer_id, bool) or not isinstance(customer_id, int)):
            raise RequestError("customer_id must be an integer")
        query = data.get("query")
        if query is not None and not isinstance(query, str):
            raise RequestError("query must be a string")
        k = data.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int):
            raise RequestError("k must be an integer")
        ranker = data.get("ranker")
        if ranker is not None and not isinstance(ranker, str):
            raise RequestError("ranker must be a string")
        for flag in ("explain", "exclude_purchased"):
            if not isinstance(data.get(flag, False), bool):
                raise RequestError(f"{flag} must be true or false")
        request = cls(
            customer_id=customer_id,
            query=query.strip() if query and query.strip() else None,
            k=k,
            ranker=ranker,
            explain=data.get("explain", False),
            exclude_purchased=data.get("exclude_purchased", False),
        )
        request.validate()
        return request

    def validate(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise RequestError(f"k must be between 1 and {MAX_K}, got {self.k}")
        if self.customer_id is None and not self.query:
            raise RequestError("a request needs a query, a customer_id, or both")
        if self.customer_id is not None and self.customer_id <= 0:
            raise RequestError("customer_id must be a positive integer")
        if self.query and len(self.query) > MAX_QUERY_CHARS:
            raise RequestError(f"query is longer than {MAX_QUERY_CHARS} characters")
        if self.ranker is not None and self.ranker not in RANKER_NAMES:
            raise RequestError(f"unknown ranker {self.ranker!r}; choose one of {', '.join(RANKER_NAMES)}")
        if self.exclude_purchased and self.customer_id is None:
            raise RequestError("exclude_purchased needs a customer_id")

    def with_defaults(self, settings: Settings) -> RecommendationRequest:
        """The same request with the ranker filled in from settings, so it can be cached and replayed."""
        if self.ranker:
            return self
        return RecommendationRequest(**{**asdict(self), "ranker": settings.ranker})

    def as_dict(self) -> dict:
        return asdict(self)



def check_idempotency_key(key: str | None) -> None:
    """An idempotency key, when given, is a non-empty string of at most MAX_IDEMPOTENCY_KEY characters."""
    if key is None:
        return
    if not isinstance(key, str) or not key.strip() or "\x00" in key:
        raise RequestError("idempotency key must be a non-empty string without NUL characters")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise RequestError(f"idempotency key is longer than {MAX_IDEMPOTENCY_KEY} characters")
