"""Rows, JSON and transactions shared by the job modules: how a job row is read, written and shown."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, text

from recsys.config import Settings
from recsys.platform.db import get_engine

RECOMMENDATION = "recommendation"
MAX_ERROR_CHARS = 2000

JOB_COLUMNS = (
    "id, kind, status, request, cache_key, idempotency_key, attempts, error, worker, created_at, sent_at, "
    "started_at, finished_at, lease_expires_at, run_after"
)


def parse_job_id(job_id) -> uuid.UUID | None:
    """A UUID from a UUID or string; None when it is not one."""
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except (ValueError, TypeError, AttributeError):
        return None


def _jsonable(value):
    """JSON-safe copy: numpy scalars become Python numbers, NaN and infinities become null (jsonb rejects them)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    if isinstance(value, datetime | uuid.UUID | Path):
        return str(value)
    return str(value)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def dumps(value) -> str:
    """JSON for jsonb: the fast path first, the cleaning copy only when a NaN or infinity is in the way."""
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except (ValueError, TypeError):
        return json.dumps(_jsonable(value))


def readable(exc: BaseException) -> str:
    """One line naming the exception, short enough to store as a job's error."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text_ = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text_[:MAX_ERROR_CHARS]


@contextmanager
def quick_commit(settings: Settings) -> Iterator[Connection]:
    """A transaction whose commit does not wait for the WAL flush (~4 ms here).

    For writes a database crash may lose without losing work: a lost claim, lease, result or
    sent_at only makes the job run or be sent again. Job inserts and cancellations keep full
    durability.
    """
    with get_engine(settings).begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit TO off"))
        yield conn


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 1)


def job_dict(row, include_result: bool = True) -> dict:
    """A job row as the API, CLI and admin pages show it."""
    data = {
        "id": str(row.id),
        "kind": row.kind,
        "status": row.status,
        "request": row.request,
        "error": row.error,
        "attempts": row.attempts,
        "worker": row.worker,
        "idempotency_key": row.idempotency_key,
        "cache_key": row.cache_key,
        "timings": {
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "sent_at": row.sent_at.isoformat() if row.sent_at else None,
            "started_at": row.started_at.isoformat() if row.started_at else None,
            "finished_at": row.finished_at.isoformat() if row.finished_at else None,
            "queued_ms": _ms(row.created_at, row.started_at),
            "run_ms": _ms(row.started_at, row.finished_at),
            "total_ms": _ms(row.created_at, row.finished_at),
        },
    }
    if include_result:
        data["result"] = row.result
    return data


def job_json(row) -> str:
    """The job as `job_dict` shows it, as JSON text, from a row whose request and result are JSON text.

    The stored request and result go into the document as Postgres prints them instead of being parsed
    and encoded again (a finished job's result is 5 KB: that round trip was most of an API job read).
    The other fields are encoded as Flask encodes them (compact, ASCII), in job_dict's order.
    """
    fields = job_dict(row)
    request, result = fields.pop("request"), fields.pop("result")
    head = _members({name: fields.pop(name) for name in ("id", "kind", "status")})
    return f'{{{head},"request":{request or "null"},{_members(fields)},"result":{result or "null"}}}'


def _members(fields: dict) -> str:
    """`fields` as the members of a compact JSON object, without its braces."""
    return json.dumps(fields, separators=(",", ":"))[1:-1]
