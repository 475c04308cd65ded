"""Parsing of query strings and JSON bodies into checked values; bad input becomes a 400 ApiError."""

from __future__ import annotations

import json
import uuid

from flask import request

from web.errors import ApiError

MAX_BIGINT = 2**63 - 1
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


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


def customer_id_value(value, name: str = "customer_id") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer")
    if not 1 <= value <= MAX_BIGINT:
        raise bad(f"{name} must be between 1 and {MAX_BIGINT}")
    return value


def uuid_value(value, name: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise bad(f"{name} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise bad(f"{name} must be a UUID, got {value[:40]!r}") from None


def json_body() -> dict:
    """The request's JSON object; 415 when it is not JSON, 400 when it does not parse or is not an object."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    try:
        data = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object")
    try:
        has_nul = _has_nul(data)
    except RecursionError:
        raise bad("the body is nested too deeply") from None
    if has_nul:
        raise bad("strings in the body must not contain NUL characters")
    return data
