"""A discover request: a need in plain words and, optionally, the customer it is for.

The API, the CLI, the Celery `recsys.discover` task and the worker all build requests through
`DiscoverRequest.from_dict`, so a need is checked by the same rules wherever it enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recsys.recommend.request import RequestError

MAX_NEED_CHARS = 500
FIELDS = ("customer_id", "need", "exclude_purchased")


@dataclass(frozen=True)
class DiscoverRequest:
    need: str
    customer_id: int | None = None
    exclude_purchased: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> DiscoverRequest:
        """Build and validate from JSON-like input; wrong types and values become RequestError."""
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object")
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise RequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
        need = data.get("need")
        if not isinstance(need, str):
            raise RequestError("need must be a string")
        customer_id = data.get("customer_id")
        if customer_id is not None and (isinstance(customer_id, bool) or not isinstance(customer_id, int)):
            raise RequestError("customer_id must be an integer")
        exclude_purchased = data.get("exclude_purchased", False)
        if not isinstance(exclude_purchased, bool):
            raise RequestError("exclude_purchased must be true or false")
        request = cls(need=" ".join(need.split()), customer_id=customer_id, exclude_purchased=exclude_purchased)
        request.validate()
        return request

    def validate(self) -> None:
        if not self.need:
            raise RequestError("need must not be empty")
        if len(self.need) > MAX_NEED_CHARS:
            raise RequestError(f"need is longer than {MAX_NEED_CHARS} characters")
        if "\x00" in self.need:
            raise RequestError("need must not contain NUL characters")
        if self.customer_id is not None and not 0 < self.customer_id <= 2**63 - 1:
            raise RequestError("customer_id must be a positive 64-bit integer")
        if self.exclude_purchased and self.customer_id is None:
            raise RequestError("exclude_purchased needs a customer_id")

    def as_dict(self) -> dict:
        return asdict(self)
