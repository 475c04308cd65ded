"""Parsing of query strings and JSON bodies into checked values; bad input becomes a 400 ApiError."""

from __future__ import annotations

import json
import uuid
from typing import TypeVar

from flask import request
from pydantic import ValidationError

from recsys.platform.bodies import Body, describe
from web.errors import ApiError

B = TypeVar("B", bound=Body)
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise bad(f"{name} must be between {low} and {high}, got {value}")
    return value


def bool_arg(name: str, default: bool = False) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise bad(f"{name} must be true or false, got {raw[:40]!r}")


def str_arg(name: str, *, required: bool = False, max_length: int = 500) -> str | None:
    raw = request.args.get(name)
    value = raw.strip() if raw is not None else None
    if not value:
        if required:
            raise bad(f"the query parameter {name} is required")
        return None
    if len(value) > max_length:
        raise bad(f"{name} is longer than {max_length} characters")
    if "\x00" in value:
        raise bad(f"{name} contains a NUL character")
    return value


def uuid_value(value, name: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise bad(f"{name} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise bad(f"{name} must be a UUID, got {value[:40]!r}") from None


def json_body():
    """The request's parsed JSON; 415 when it is not JSON, 400 when it does not parse."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    try:
        return json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def parse_body(model: type[B]) -> B:
    """The JSON body validated as `model`; a 400 whose message names each bad field and its rule."""
    data = json_body()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad(describe(exc, model.model_json_schema)) from None
