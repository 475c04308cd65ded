"""A discover request: a need in plain words and, optionally, the customer it is for.

`DiscoverRequest` is the API's request body (POST /api/v1/discover) and the request the CLI, the
Celery `recsys.discover` task and the worker build (through `from_dict`), so a need is checked by
the same rules wherever it enters, and the OpenAPI schema is generated from the same class.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator, model_validator

from recsys.platform.bodies import Body, CustomerId, RequestError

__all__ = ["MAX_NEED_CHARS", "DiscoverRequest", "RequestError"]

MAX_NEED_CHARS = 500


class DiscoverRequest(Body):
    """A need ("a garden party next week"), for a customer or for nobody in particular."""

    need: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NEED_CHARS)] = Field(
        description="what the customer needs, in plain words; runs of white space count as one space")
    customer_id: CustomerId | None = Field(
        None, description="whose profile (country, recent purchases) goes into the prompt; unknown: none")
    exclude_purchased: bool = Field(False, description="leave out what customer_id bought")

    @field_validator("need", mode="before")
    @classmethod
    def _one_line(cls, need):
        return " ".join(need.split()) if isinstance(need, str) else need

    @model_validator(mode="after")
    def _servable(self) -> DiscoverRequest:
        if self.exclude_purchased and self.customer_id is None:
            raise ValueError("exclude_purchased needs a customer_id")
        return self

    def as_dict(self) -> dict:
        return self.model_dump()
