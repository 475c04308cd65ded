"""Submitting jobs: validate, answer from the cache, or record a queued job and send its message.

The row is committed before the message is sent, so a broker that is down loses nothing: the
job stays queued and the sweeper sends it again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, text

from recsys.config import Settings
from recsys.jobs.store import RECOMMENDATION, dumps, parse_job_id, quick_commit, readable
from recsys.platform import broker
from recsys.platform.db import get_engine
from recsys.recommend import cache
from recsys.recommend.request import RecommendationRequest, RequestError, check_idempotency_key

log = logging.getLogger(__name__)


@dataclass
class SubmitOutcome:
    """What a submit did: a cache hit (`cached`, `result`, no job) or a job, new or found by its idempotency key."""

    job_id: uuid.UUID | None
    status: str
    result: dict | None
    cached: bool
    created: bool

    def as_dict(self) -> dict:
        data = asdict(self)
        data["job_id"] = str(self.job_id) if self.job_id else None
        return data


def submit_recommendation(
    payload: dict, settings: Settings, *, idempotency_key: str | None = None
) -> SubmitOutcome:
    """A recommendation job, with the request's ranker filled in from settings: see `submit_job`."""
    request = RecommendationRequest.from_dict(payload).with_defaults(settings)
    return submit_job(RECOMMENDATION, request, settings, idempotency_key=idempotency_key)


def submit_job(kind_name: str, payload, settings: Settings, *, idempotency_key: str | None = None) -> SubmitOutcome:
    """Validate, answer from the cache, or record a queued job of this kind (recsys.jobs.kinds) and send it.

    Bad input raises RequestError and writes nothing. A cache hit answers with the job that made
    the answer. A repeated idempotency key returns the job it first created (`created=False`); the
    same key with a different request is an error. A broker that is down is logged, not raised:
    the job stays queued for the sweeper.
    """
    from recsys.jobs.kinds import job_kind

    kind = job_kind(kind_name)
    request = payload if hasattr(payload, "as_dict") else kind.parse(payload)
    check_idempotency_key(idempotency_key)
    stored_request = request.as_dict()
    with get_engine(settings).begin() as conn:
        if idempotency_key is not None:
            existing = _existing_for_key(conn, idempotency_key, stored_request)
            if existing is not None:
                return existing
        key = kind.cache_key(conn, request, settings)
        hit = cache.lookup(conn, key)
        if hit is not None:
            # This transaction wrote only the hit count: its commit need not wait for the WAL flush
            # (a crash may lose a few counts, never a job).
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            cache.record_hit(settings)  # the dashboard's hit rate counts every kind's hits and jobs
            return SubmitOutcome(job_id=hit.job_id, status="succeeded", result=hit.result, cached=True, created=False)
        job_id = uuid.uuid4()
        inserted = conn.execute(
            text(
                """
                INSERT INTO jobs (id, kind, status, request, cache_key, idempotency_key, sent_at)
                VALUES (:id, :kind, 'queued', CAST(:request AS jsonb), :cache_key, :idem, now())
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING id
                """
            ),
            {"id": job_id, "kind": kind.name, "request": dumps(stored_request), "cache_key": key,
             "idem": idempotency_key},
        ).scalar_one_or_none()
        if inserted is None:
            existing = _existing_for_key(conn, idempotency_key, stored_request)
            if existing is not None:
                return existing
            raise RuntimeError(f"job with idempotency key {idempotency_key!r} vanished while submitting")
    send_job(job_id, settings, sent_at_recorded=True)
    return SubmitOutcome(job_id=job_id, status="queued", result=None, cached=False, created=True)


def submit_discover(payload, settings: Settings, *, idempotency_key: str | None = None) -> SubmitOutcome:
    """A discover job (a need, optionally a customer): see `submit_job`."""
    return submit_job("discover", payload, settings, idempotency_key=idempotency_key)


def _existing_for_key(conn: Connection, idempotency_key: str, stored_request: dict) -> SubmitOutcome | None:
    row = conn.execute(
        text("SELECT id, status, request, result FROM jobs WHERE idempotency_key = :k"), {"k": idempotency_key}
    ).one_or_none()
    if row is None:
        return None
    if row.request != stored_request:
        raise RequestError(f"idempotency key {idempotency_key!r} was already used for a different request")
    result = row.result if row.status == "succeeded" else None
    return SubmitOutcome(job_id=row.id, status=row.status, result=result, cached=False, created=False)


def send_job(
    job_id, settings: Settings, *, countdown: float | None = None, sent_at_recorded: bool = False
) -> bool:
    """Send the job's Celery message and record when; False (logged) when the broker did not take it.

    `sent_at_recorded`: the caller already wrote sent_at with the job row (a submit saves a
    transaction that way); it is cleared again if the broker refuses the message.
    """
    try:
        broker.send_rerank(str(job_id), settings, countdown=countdown)
    except broker.BrokerUnavailable as exc:
        log.warning("job %s stays queued until the sweeper re-sends it: %s", job_id, exc)
        if sent_at_recorded:
            _set_sent_at(job_id, None, settings)
        return False
    if not sent_at_recorded:
        _set_sent_at(job_id, float(countdown or 0), settings)
    return True


def _set_sent_at(job_id, delay: float | None, settings: Settings) -> None:
    """sent_at = now() + delay; a None delay clears it (make_interval is strict), for a message never taken."""
    try:
        with quick_commit(settings) as conn:
            conn.execute(
                text("UPDATE jobs SET sent_at = now() + make_interval(secs => CAST(:delay AS float8)) WHERE id = :id"),
                {"id": job_id, "delay": delay},
            )
    except Exception as exc:
        log.warning("job %s: its sent_at was not recorded: %s", job_id, readable(exc))


def cancel_job(job_id, settings: Settings) -> bool:
    """Cancel a job that has not started; False for unknown, running or finished jobs."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return False
    with get_engine(settings).begin() as conn:
        row = conn.execute(
            text(
                """
                UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(), run_after = NULL
                WHERE id = :id AND status = 'queued' RETURNING id
                """
            ),
            {"id": parsed},
        ).one_or_none()
    return row is not None
