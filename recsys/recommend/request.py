"""A recommendation request: its fields, limits and validation, in one place.

`RecommendationRequest` is the API's request body and the request the CLI, the Celery `recsys.submit`
task and the worker build (through `from_dict`), so a request is checked by the same rules wherever
it enters, and the OpenAPI schema is generated from the same class.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from recsys.config import Settings
from recsys.platform.bodies import Body, CustomerId, RequestError, describe
from recsys.rankers import RANKER_NAMES

MAX_K = 50
MAX_QUERY_CHARS = 500
MAX_IDEMPOTENCY_KEY = 200


class RecommendationRequest(Body):
    """A query, a customer_id, or both. Unknown customers are served as a cold start."""

    customer_id: CustomerId | None = None
    query: Annotated[str, StringConstraints(strip_whitespace=True, max_length=MAX_QUERY_CHARS)] | None = Field(
        None, description="what the customer is looking for; blank counts as none")
    k: int = Field(10, ge=1, le=MAX_K, description="how many products")
    ranker: Literal[RANKER_NAMES] | None = Field(None, description="ranker name; default RECSYS_RANKER")
    explain: bool = Field(False, description="give each item the reasons for its place")
    exclude_purchased: bool = Field(False, description="leave out what customer_id bought")

    def __init__(self, *args, **fields) -> None:
        """Fields by keyword, or by position in declaration order (short requests in tests and scripts)."""
        super().__init__(**dict(zip(type(self).model_fields, args, strict=False)), **fields)

    @field_validator("query")
    @classmethod
    def _blank_query_is_none(cls, query: str | None) -> str | None:
        return query or None

    @model_validator(mode="after")
    def _servable(self) -> RecommendationRequest:
        if self.customer_id is None and not self.query:
            raise ValueError("a request needs a query, a customer_id, or both")
        if self.exclude_purchased and self.customer_id is None:
            raise ValueError("exclude_purchased needs a customer_id")
        return self

    def with_defaults(self, settings: Settings) -> RecommendationRequest:
        """The same request with the ranker filled in from settings, so it can be cached and replayed."""
        return self if self.ranker else self.model_copy(update={"ranker": settings.ranker})

    def as_dict(self) -> dict:
        return self.model_dump()


def _has_text(key: str) -> str:
    if not key.strip():
        raise ValueError("idempotency key must not be blank")
    if "\x00" in key:
        raise ValueError("idempotency key must not contain NUL characters")
    return key


IDEMPOTENCY_KEY = TypeAdapter(
    Annotated[str, StringConstraints(min_length=1, max_length=MAX_IDEMPOTENCY_KEY), AfterValidator(_has_text)],
    config={"strict": True},
)


def check_idempotency_key(key: str | None) -> None:
    """An idempotency key, when given, is a non-blank string of at most MAX_IDEMPOTENCY_KEY characters."""
    if key is None:
        return
    try:
        IDEMPOTENCY_KEY.validate_python(key)
    except ValidationError as exc:
        raise RequestError(describe(exc, IDEMPOTENCY_KEY.json_schema, "idempotency key")) from None
