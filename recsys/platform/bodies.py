"""Request bodies: the strict base every body model builds on, and the one wording of their errors.

Each body is a pydantic model next to its concept (`recommend/request.py`, `feedback.py`). The same
model validates input from every entry point (API, CLI, Celery task, worker), words the error the
client sees, and is the API's documented schema (`web/openapi.py` builds its components from
`model_json_schema()`), so the three cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_BIGINT = 2**63 - 1

CustomerId = Annotated[int, Field(ge=1, le=MAX_BIGINT, description="a customer id (positive, fits a bigint)")]
StockCode = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class RequestError(ValueError):
    """A request that cannot be served as given; the message says why, for the client."""


class Body(BaseModel):
    """A request body: strict types ("5" is not 5, true is not 1), unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _without_nul(cls, value: Any, info: ValidationInfo) -> Any:
        # Postgres text and jsonb cannot hold NUL; refuse it here rather than fail on insert.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError(f"{info.field_name} must not contain NUL characters")
        return value

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate JSON-like input (from the CLI, a task or a stored job); RequestError if bad.

        A body the API has already validated passes through as it is.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RequestError(describe(exc, cls.model_json_schema)) from None


def describe(exc: ValidationError, schema, name: str = "value") -> str:
    """One line for the client that names each bad field and the rule it broke.

    `schema` is the JSON schema validated against (or a function returning it): range errors quote
    both documented bounds from it. `name` stands for a bare value's location (a header, say).
    """
    messages: list[str] = []
    unknown: list[str] = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or name
        if error["type"] == "extra_forbidden":
            unknown.append(field)
            continue
        message = _wording(error, field, schema)
        if message not in messages:
            messages.append(message)
    if unknown:
        messages.append(f"unknown field(s): {', '.join(sorted(unknown))}")
    return "; ".join(messages)


def _wording(error: dict, field: str, schema) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "the request must be a JSON object"
    if kind == "missing":
        return f"{field} is required"
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return f"{field} must be an integer"
    if kind in ("string_type", "str_type"):
        return f"{field} must be a string"
    if kind in ("bool_type", "bool_parsing"):
        return f"{field} must be true or false"
    if kind in ("float_type", "float_parsing"):
        return f"{field} must be a number"
    if kind.startswith("uuid"):
        return f"{field} must be a UUID"
    if kind == "literal_error":
        choices = ctx["expected"].replace(" or ", ", ").replace("'", "")
        return f"unknown {field} {_shown(value)}; choose one of {choices}"
    if kind == "string_too_long":
        return f"{field} is longer than {ctx['max_length']} characters"
    if kind == "string_too_short":
        return f"{field} must not be empty" if ctx["min_length"] == 1 else (
            f"{field} is shorter than {ctx['min_length']} characters")
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(schema, error["loc"])
        if low is not None and high is not None:
            return f"{field} must be between {low} and {high}, got {_shown(value)}"
        bound = next(iter(ctx.values()))
        rule = {"greater_than_equal": "at least", "less_than_equal": "at most",
                "greater_than": "more than", "less_than": "less than"}[kind]
        return f"{field} must be {rule} {bound}, got {_shown(value)}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return f"{field}: {error['msg']}"


def _bounds(schema, loc: tuple) -> tuple[Any, Any]:
    """(minimum, maximum) the schema documents for the field at `loc`, None where it has none."""
    node = schema() if callable(schema) else schema
    for part in loc:
        node = (node.get("properties") or {}).get(part, {}) if isinstance(part, str) else {}
    for option in [node, *node.get("anyOf", [])]:
        if "minimum" in option or "maximum" in option:
            return option.get("minimum"), option.get("maximum")
    return None, None


def _shown(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else repr(value)
