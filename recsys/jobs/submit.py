"""Submitting jobs: validate, answer from the cache, or record a queued job and send its message.

The row is committed before the message is sent, so a broker that is down loses nothing: the
job stays queued and the sweeper sends it again.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from functools import cached_property

import psycopg
from sqlalchemy import Connection, text

from recsys.config import Settings
from recsys.jobs import relay
from recsys.jobs.store import RECOMMENDATION, dumps, parse_job_id, quick_commit, readable
from recsys.platform import broker
from recsys.platform.db import get_engine, read_once, run_bare
from recsys.recommend import cache
from recsys.recommend.request import RecommendationRequest, RequestError, check_idempotency_key

log = logging.getLogger(__name__)

# ON CONFLICT without a target: an idempotency key already taken, or this very row written by a first try whose
# connection died before it could answer (run_bare runs the insert again); `_insert_job` tells them apart.
INSERT_JOB = """
    INSERT INTO jobs (id, kind, status, request, cache_key, idempotency_key, sent_at)
    VALUES (%(id)s, %(kind)s, 'queued', CAST(%(request)s AS jsonb), %(cache_key)s, %(idem)s, now())
    ON CONFLICT DO NOTHING
    RETURNING id
"""
# A recommendation's probe and, on a miss, its job row in one statement (so one round trip and one commit):
# the insert is INSERT_JOB's, keyed by the key the same statement computed, and skipped on a hit or for a
# request `cache.check_servable` refuses.
ANSWER_OR_QUEUE = f"""
    WITH {cache.KEYED_CTES},
    cached AS (SELECT c.result, c.job_id FROM keyed JOIN result_cache c USING (cache_key)),
    queued AS (
        INSERT INTO jobs (id, kind, status, request, cache_key, idempotency_key, sent_at)
        SELECT %(id)s, %(kind)s, 'queued', CAST(%(request)s AS jsonb), keyed.cache_key, %(idem)s, now()
        FROM keyed
        WHERE NOT EXISTS (SELECT FROM cached) AND (keyed.purchases > 0 OR NOT %(needs_purchases)s)
        ON CONFLICT DO NOTHING
        RETURNING id
    )
    SELECT keyed.purchases, keyed.cache_key, CAST(cached.result AS text), cached.job_id, EXISTS (SELECT FROM queued)
    FROM keyed LEFT JOIN cached ON true
"""
JOB_FOR_KEY = "SELECT id, status, request, CAST(result AS text) FROM jobs WHERE idempotency_key = %(k)s"


@dataclass
class SubmitOutcome:
    """What a submit did: a cache hit (`cached`, `result`, no job) or a job, new or found by its idempotency key.

    The result is kept as the JSON text the database stored (`result_json`): the API sends it on as it is,
    and `result` parses it only for callers that look inside.
    """

    job_id: uuid.UUID | None
    status: str
    result_json: str | None
    cached: bool
    created: bool

    @cached_property
    def result(self) -> dict | None:
        return json.loads(self.result_json) if self.result_json is not None else None

    def as_dict(self) -> dict:
        return {"job_id": str(self.job_id) if self.job_id else None, "status": self.status, "result": self.result,
                "cached": self.cached, "created": self.created}


def submit_recommendation(
    payload: dict, settings: Settings, *, idempotency_key: str | None = None, wait_for_broker: bool = True
) -> SubmitOutcome:
    """A recommendation job, with the request's ranker filled in from settings: see `submit_job`."""
    request = RecommendationRequest.from_dict(payload).with_defaults(settings)
    return submit_job(RECOMMENDATION, request, settings, idempotency_key=idempotency_key,
                      wait_for_broker=wait_for_broker)


def submit_job(
    kind_name: str, payload, settings: Settings, *, idempotency_key: str | None = None, wait_for_broker: bool = True
) -> SubmitOutcome:
    """Validate, answer from the cache, or record a queued job of this kind (recsys.jobs.kinds) and send it.

    Bad input raises RequestError and writes nothing. A cache hit answers with the job that made
    the answer. A repeated idempotency key returns the job it first created (`created=False`); the
    same key with a different request is an error. A broker that is down is logged, not raised:
    the job stays queued for the sweeper.

    Statements run in autocommit on an unpinged connection (`run_bare`): a recommendation is answered from
    the cache or queued in one statement, so a hit costs one round trip and a new job two (the statement and
    its message), or one where the relay sends the message. The insert commits with the server's
    synchronous_commit, so the job is on disk before its message is sent.

    `wait_for_broker=False` (the API) returns once the job row is committed and hands its message to the
    process's relay (recsys.jobs.relay), which pushes it with the others of the next few milliseconds; a
    message the broker does not take is left to the sweeper, as when the broker is down.
    """
    from recsys.jobs.kinds import job_kind

    kind = job_kind(kind_name)
    request = payload if hasattr(payload, "as_dict") else kind.parse(payload)
    check_idempotency_key(idempotency_key)
    stored_request = request.as_dict()
    if idempotency_key is not None:
        existing = run_bare(settings, lambda db: _existing_for_key(db, idempotency_key, stored_request))
        if existing is not None:
            return existing
    job_id = uuid.uuid4()
    row = {"id": job_id, "kind": kind.name, "request": dumps(stored_request), "idem": idempotency_key}
    key, hit, queued = _answer_or_queue(kind, request, row, settings)
    if hit is not None:
        cache.record_hit(settings, key)  # the dashboard's hit rate counts every kind's hits and jobs
        return SubmitOutcome(job_id=hit.job_id, status="succeeded", result_json=hit.result_json, cached=True,
                             created=False)
    if not queued:
        existing = run_bare(settings, lambda db: _insert_job(db, {**row, "cache_key": key}, stored_request))
        if existing is not None:
            return existing
    send_job(job_id, settings, sent_at_recorded=True, wait=wait_for_broker)
    return SubmitOutcome(job_id=job_id, status="queued", result_json=None, cached=False, created=True)


def _answer_or_queue(kind, request, row: dict, settings: Settings) -> tuple[str, cache.CachedAnswer | None, bool]:
    """(cache key, cached answer, whether the job row was inserted and committed).

    A recommendation (the busy kind) is answered or queued in one statement; other kinds read their key and
    answer here and leave the insert to `_insert_job`.
    """
    if kind.name == RECOMMENDATION:
        return run_bare(settings, lambda db: _recommendation_or_job(db, request, row, settings))

    def key_and_answer(conn: Connection) -> tuple[str, cache.CachedAnswer | None, bool]:
        key = kind.cache_key(conn, request, settings)
        return key, cache.lookup(conn, key), False

    return read_once(settings, key_and_answer)


def _recommendation_or_job(db: psycopg.Cursor, request, row: dict, settings: Settings):
    parameters = {**row, **cache.key_parameters(request, settings), "needs_purchases": cache.needs_purchases(request)}
    purchases, key, result, made_by, queued = db.execute(ANSWER_OR_QUEUE, parameters).fetchone()
    cache.check_servable(request, purchases)
    return key, cache.CachedAnswer(result, made_by) if result is not None else None, queued


def _insert_job(db: psycopg.Cursor, row: dict, stored_request: dict) -> SubmitOutcome | None:
    """Insert the queued job (committed when this returns); the job first made with its idempotency key, if any."""
    if db.execute(INSERT_JOB, row).fetchone() is not None:
        return None
    if db.execute("SELECT 1 FROM jobs WHERE id = %(id)s", row).fetchone() is not None:
        return None  # inserted by the first try, whose connection died before it answered
    existing = _existing_for_key(db, row["idem"], stored_request) if row["idem"] is not None else None
    if existing is None:
        raise RuntimeError(f"job with idempotency key {row['idem']!r} vanished while submitting")
    return existing


def submit_discover(
    payload, settings: Settings, *, idempotency_key: str | None = None, wait_for_broker: bool = True
) -> SubmitOutcome:
    """A discover job (a need, optionally a customer): see `submit_job`."""
    return submit_job("discover", payload, settings, idempotency_key=idempotency_key, wait_for_broker=wait_for_broker)


def _existing_for_key(db: psycopg.Cursor, idempotency_key: str, stored_request: dict) -> SubmitOutcome | None:
    row = db.execute(JOB_FOR_KEY, {"k": idempotency_key}).fetchone()
    if row is None:
        return None
    job_id, status, request, result = row
    if request != stored_request:
        raise RequestError(f"idempotency key {idempotency_key!r} was already used for a different request")
    return SubmitOutcome(job_id=job_id, status=status, result_json=result if status == "succeeded" else None,
                         cached=False, created=False)


def send_job(
    job_id, settings: Settings, *, countdown: float | None = None, sent_at_recorded: bool = False, wait: bool = True
) -> bool:
    """Send the job's Celery message and record when; False (logged) when the broker did not take it.

    `sent_at_recorded`: the caller already wrote sent_at with the job row (a submit saves a transaction that
    way); it is cleared again if the broker refuses the message (`relay.leave_to_sweeper`). `wait=False`: the
    message is handed to this process's relay (recsys.jobs.relay), which pushes it with others a few
    milliseconds later and treats a refusal the same way; for committed rows with sent_at recorded, no countdown.
    """
    if not wait:
        if countdown or not sent_at_recorded:
            raise ValueError("only a job whose row records sent_at, without a countdown, can go through the relay")
        relay.hand_over(job_id, settings)
        return True
    try:
        broker.send_rerank(str(job_id), settings, countdown=countdown)
    except broker.BrokerUnavailable as exc:
        if sent_at_recorded:
            relay.leave_to_sweeper([job_id], exc, settings)
        else:
            log.warning("job %s stays queued until the sweeper re-sends it: %s", job_id, exc)
        return False
    if not sent_at_recorded:
        _record_sent_at(job_id, float(countdown or 0), settings)
    return True


def _record_sent_at(job_id, delay: float, settings: Settings) -> None:
    """sent_at = now() + delay: when the message was sent, or when its countdown ends."""
    try:
        with quick_commit(settings) as conn:
            conn.execute(text("UPDATE jobs SET sent_at = now() + make_interval(secs => CAST(:delay AS float8)) "
                              "WHERE id = :id"), {"id": job_id, "delay": delay})
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
