"""Durable recommendation jobs: submit, claim, rank in batches, retry, sweep, report.

The jobs table is the source of truth. A job row is committed before its Celery message is
sent, so a broker that is down loses nothing: the row stays `queued` and the sweeper
(`requeue_stale`, run by Celery beat and `recsys jobs requeue`) sends it again. Messages are
only hints: a worker claims jobs in the database (UPDATE … FOR UPDATE SKIP LOCKED), so no two
workers run one job, and a message whose job is already finished does nothing.

A claimed job holds a lease (`lease_expires_at`, `RECSYS_JOB_STALE_SECONDS` long) that the
worker process renews while it works. A job left `running` by a killed worker is claimed
again when its lease has run out, or at once when its owner is a process on this host that no
longer exists; every state change after the claim checks (worker, attempts), so a worker
that lost its claim can never overwrite the new owner's result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, text

from recsys import cache, celery_client
from recsys.config import Settings, get_settings
from recsys.db import get_engine
from recsys.models import JOB_STATUSES
from recsys.pipeline import RecommendationRequest, RequestError, recommend_batch

log = logging.getLogger(__name__)

JOB_KIND = "recommendation"
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
HEARTBEAT_PREFIX = "recsys:worker:"
MAX_IDEMPOTENCY_KEY = 200
MAX_ERROR_CHARS = 2000
MAX_BACKOFF_SECONDS = 60.0
POLL_SECONDS = 0.01

_JOB_COLUMNS = (
    "id, kind, status, request, cache_key, idempotency_key, attempts, error, worker, created_at, sent_at, "
    "started_at, finished_at, lease_expires_at, run_after"
)


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


@dataclass
class RunOutcome:
    """What one `run_job` call found or did for its job; `retry_in` asks the caller to try again later."""

    job_id: str
    status: str
    result: dict | None = None
    error: str | None = None
    ran: bool = False
    retry_in: float | None = None
    others: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"job_id": self.job_id, "status": self.status, "result": self.result, "error": self.error}


@dataclass
class _Claimed:
    id: uuid.UUID
    request: dict
    cache_key: str | None
    attempts: int
    prior_error: str | None = None


# ---------------------------------------------------------------- helpers


def _settings(settings: Settings | None) -> Settings:
    return settings or get_settings()


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


def _dumps(value) -> str:
    """JSON for jsonb: the fast path first, the cleaning copy only when a NaN or infinity is in the way."""
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except (ValueError, TypeError):
        return json.dumps(_jsonable(value))


def _readable(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text_ = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text_[:MAX_ERROR_CHARS]


def backoff_seconds(attempts: int) -> float:
    """1, 2, 4, … seconds after the 1st, 2nd, 3rd failed attempt, at most a minute."""
    return min(2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def lease_seconds(settings: Settings) -> float:
    return float(max(settings.job_stale_seconds, 1))


def heartbeat_interval(settings: Settings) -> float:
    """How often a worker renews its leases and heartbeat: a third of the lease, between 1 and 10 s."""
    return min(max(lease_seconds(settings) / 3, 1.0), 10.0)


def worker_identity(pid: int | None = None) -> str:
    """host:pid of the process that runs jobs; stored in jobs.worker and used to tell a dead owner."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def _owner_is_gone(owner: str | None, job_id: uuid.UUID, me: str) -> bool:
    """True when the job's owner surely stopped working on it: this process, no longer busy with it
    (an earlier attempt here broke off, e.g. while the database restarted), or a process on this host
    that no longer runs (or is a zombie). Owners elsewhere are judged by their lease alone."""
    if not owner or ":" not in owner:
        return False
    if owner == me:
        with _active_lock:
            return job_id not in _active
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" in status or "\nState:\tX" in status


@contextmanager
def _quick_commit(settings: Settings) -> Iterator[Connection]:
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


def _job_dict(row, include_result: bool = True) -> dict:
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


# ---------------------------------------------------------------- submitting


def submit_recommendation(
    payload: dict, *, idempotency_key: str | None = None, settings: Settings | None = None
) -> SubmitOutcome:
    """Validate, answer from the cache, or record a queued job and send it to the worker.

    Bad input raises RequestError and writes nothing. A repeated idempotency key returns the
    job it first created (`created=False`); the same key with a different request is an error.
    A broker that is down is logged, not raised: the job stays queued for the sweeper.
    """
    settings = _settings(settings)
    request = RecommendationRequest.from_dict(payload).with_defaults(settings)
    request.validate()
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key.strip():
            raise RequestError("idempotency key must be a non-empty string")
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise RequestError(f"idempotency key is longer than {MAX_IDEMPOTENCY_KEY} characters")
    stored_request = request.as_dict()
    with get_engine(settings).begin() as conn:
        if idempotency_key is not None:
            existing = _existing_for_key(conn, idempotency_key, stored_request)
            if existing is not None:
                return existing
        key = cache.cache_key(conn, request, settings)
        hit = cache.lookup(conn, key)
        if hit is not None:
            return SubmitOutcome(job_id=None, status="succeeded", result=hit, cached=True, created=False)
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
            {"id": job_id, "kind": JOB_KIND, "request": _dumps(stored_request), "cache_key": key,
             "idem": idempotency_key},
        ).scalar_one_or_none()
        if inserted is None:
            existing = _existing_for_key(conn, idempotency_key, stored_request)
            if existing is not None:
                return existing
            raise RuntimeError(f"job with idempotency key {idempotency_key!r} vanished while submitting")
    send_job(job_id, settings, sent_at_recorded=True)
    return SubmitOutcome(job_id=job_id, status="queued", result=None, cached=False, created=True)


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
    job_id, settings: Settings | None = None, *, countdown: float | None = None, sent_at_recorded: bool = False
) -> bool:
    """Send the job's Celery message and record when; False (logged) when the broker did not take it.

    `sent_at_recorded`: the caller already wrote sent_at with the job row (a submit saves a
    transaction that way); it is cleared again if the broker refuses the message.
    """
    settings = _settings(settings)
    try:
        celery_client.send_rerank(str(job_id), settings, countdown=countdown)
    except celery_client.BrokerUnavailable as exc:
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
        with _quick_commit(settings) as conn:
            conn.execute(
                text("UPDATE jobs SET sent_at = now() + make_interval(secs => CAST(:delay AS float8)) WHERE id = :id"),
                {"id": job_id, "delay": delay},
            )
    except Exception as exc:
        log.warning("job %s: its sent_at was not recorded: %s", job_id, _readable(exc))


# ---------------------------------------------------------------- reading


def get_job(job_id, settings: Settings | None = None) -> dict | None:
    """One job with its request, result, error, attempts, worker and timings; None if unknown."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return None
    with get_engine(_settings(settings)).connect() as conn:
        row = conn.execute(
            text(f"SELECT {_JOB_COLUMNS}, result FROM jobs WHERE id = :id"), {"id": parsed}
        ).one_or_none()
    return _job_dict(row) if row is not None else None


def _check_status(status: str | None) -> None:
    if status is not None and status not in JOB_STATUSES:
        raise RequestError(f"unknown job status {status!r}; choose one of {', '.join(JOB_STATUSES)}")


def list_jobs(
    *, status: str | None = None, limit: int = 50, offset: int = 0, settings: Settings | None = None
) -> list[dict]:
    """Newest jobs first, like `get_job` but without the (large) result."""
    _check_status(status)
    if not 1 <= limit <= 1000:
        raise RequestError(f"limit must be between 1 and 1000, got {limit}")
    if offset < 0:
        raise RequestError(f"offset must not be negative, got {offset}")
    with get_engine(_settings(settings)).connect() as conn:
        rows = conn.execute(
            text(
                f"""
                SELECT {_JOB_COLUMNS} FROM jobs
                WHERE CAST(:status AS text) IS NULL OR status = :status
                ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset
                """
            ),
            {"status": status, "limit": limit, "offset": offset},
        ).all()
    return [_job_dict(row, include_result=False) for row in rows]


def count_jobs(status: str | None = None, settings: Settings | None = None) -> int:
    _check_status(status)
    with get_engine(_settings(settings)).connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM jobs WHERE CAST(:status AS text) IS NULL OR status = :status"),
            {"status": status},
        ).scalar_one()


def job_counts(settings: Settings | None = None) -> dict[str, int]:
    """Jobs per status, every status present (0 when none)."""
    with get_engine(_settings(settings)).connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) AS n FROM jobs GROUP BY status")).all()
    counts = dict.fromkeys(JOB_STATUSES, 0)
    counts.update({row.status: row.n for row in rows})
    return counts


def job_throughput(settings: Settings | None = None, window_seconds: int = 3600) -> dict:
    """Jobs finished in the last `window_seconds`: count, jobs/s, and submit→finished latency p50/p95 (ms)."""
    if window_seconds <= 0:
        raise RequestError(f"window must be positive, got {window_seconds}")
    with get_engine(_settings(settings)).connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT count(*) AS finished,
                       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
                           AS p50, percentile_cont(0.95) WITHIN GROUP
                           (ORDER BY extract(epoch FROM finished_at - created_at)) AS p95,
                       extract(epoch FROM max(finished_at) - min(created_at)) AS span
                FROM jobs
                WHERE status IN ('succeeded', 'failed') AND finished_at >= now() - make_interval(secs => :window)
                """
            ),
            {"window": window_seconds},
        ).one()
    span = float(row.span) if row.span else None
    return {
        "window_seconds": window_seconds,
        "finished": row.finished,
        "succeeded": row.succeeded,
        "failed": row.failed,
        "jobs_per_second": round(row.finished / window_seconds, 3),
        "busy_jobs_per_second": round(row.finished / span, 2) if span else None,
        "p50_ms": round(float(row.p50) * 1000, 1) if row.p50 is not None else None,
        "p95_ms": round(float(row.p95) * 1000, 1) if row.p95 is not None else None,
    }


def cache_stats(settings: Settings | None = None) -> dict:
    """Cache entries and hits."""
    with get_engine(_settings(settings)).connect() as conn:
        return cache.stats(conn)


# ---------------------------------------------------------------- managing


def cancel_job(job_id, settings: Settings | None = None) -> bool:
    """Cancel a job that has not started; False for unknown, running or finished jobs."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return False
    with get_engine(_settings(settings)).begin() as conn:
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


def requeue_stale(settings: Settings | None = None, older_than_seconds: float | None = None) -> int:
    """The sweeper: re-send queued jobs whose message is older than the threshold and running jobs whose lease ran out.

    Threshold: `older_than_seconds`, else RECSYS_JOB_STALE_SECONDS. Jobs whose lost workers used up
    every attempt are marked failed instead. Returns how many messages were sent.
    """
    settings = _settings(settings)
    older = float(settings.job_stale_seconds if older_than_seconds is None else older_than_seconds)
    with get_engine(settings).begin() as conn:
        given_up = conn.execute(
            text(
                """
                UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
                       error = 'gave up after ' || attempts || ' attempts: the worker running it was lost'
                              || coalesce(' (last error: ' || error || ')', '')
                WHERE status = 'running' AND lease_expires_at < now() AND attempts >= :max
                RETURNING id
                """
            ),
            {"max": settings.job_max_attempts},
        ).all()
        stale = conn.execute(
            text(
                """
                SELECT id FROM jobs
                WHERE kind = :kind AND (
                      (status = 'queued' AND coalesce(sent_at, created_at) < now() - make_interval(secs => :older))
                   OR (status = 'running' AND lease_expires_at < now()))
                ORDER BY created_at
                FOR UPDATE SKIP LOCKED
                """
            ),
            {"kind": JOB_KIND, "older": older},
        ).scalars().all()
    for job_id in given_up:
        log.warning("job %s failed: its worker was lost on every attempt", job_id[0])
    sent = 0
    for job_id in stale:
        if not send_job(job_id, settings):
            break
        sent += 1
    if stale:
        log.info("sweeper re-sent %d of %d stale jobs", sent, len(stale))
    return sent


def cleanup_jobs(older_than_seconds: float, settings: Settings | None = None) -> int:
    """Delete finished (succeeded, failed, cancelled) jobs that finished more than `older_than_seconds` ago."""
    if older_than_seconds < 0:
        raise RequestError(f"age must not be negative, got {older_than_seconds}")
    with get_engine(_settings(settings)).begin() as conn:
        return conn.execute(
            text(
                """
                DELETE FROM jobs
                WHERE status IN ('succeeded', 'failed', 'cancelled')
                  AND finished_at < now() - make_interval(secs => :older)
                """
            ),
            {"older": float(older_than_seconds)},
        ).rowcount


def wait_for_job(job_id, timeout: float = 60.0, settings: Settings | None = None, poll: float = 0.05) -> dict | None:
    """Poll until the job is finished or `timeout` passes; the job as `get_job` shows it."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id, settings)
        if job is None or job["status"] in FINISHED_STATUSES or time.monotonic() >= deadline:
            return job
        time.sleep(poll)


# ---------------------------------------------------------------- worker side

_active: set[uuid.UUID] = set()
_active_lock = threading.Lock()
_processed = 0


def _track(ids: Sequence[uuid.UUID], active: bool) -> None:
    with _active_lock:
        if active:
            _active.update(ids)
        else:
            _active.difference_update(ids)


def _claim_sql(where: str) -> str:
    return f"""
        UPDATE jobs AS j
        SET status = 'running', attempts = j.attempts + 1, started_at = now(), worker = :worker,
            lease_expires_at = now() + make_interval(secs => :lease), run_after = NULL, updated_at = now()
        FROM (SELECT id FROM jobs WHERE {where} FOR UPDATE SKIP LOCKED) AS c
        WHERE j.id = c.id
        RETURNING j.id, j.request, j.cache_key, j.attempts, j.error
    """


_CLAIM_OWN = _claim_sql(
    "id = :id AND kind = :kind AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))"
)
_CLAIM_FROM_DEAD = _claim_sql(
    "id = :id AND kind = :kind AND status = 'running' AND worker = :owner AND attempts = :attempts"
)
_CLAIM_QUEUED = _claim_sql(
    "status = 'queued' AND kind = :kind AND (run_after IS NULL OR run_after <= now()) "
    "ORDER BY created_at LIMIT :n"
)


def _claim(conn: Connection, sql: str, params: dict) -> list[_Claimed]:
    rows = conn.execute(text(sql), params).all()
    return [_Claimed(row.id, row.request, row.cache_key, row.attempts, row.error) for row in rows]


def run_job(job_id, *, worker: str, settings: Settings | None = None) -> RunOutcome:
    """Handle one job's message: claim it, drain more queued jobs into a batch, rank them together, record.

    Finished jobs are left alone (checked first with one cheap read: most messages of a busy
    worker find their job already ranked in an earlier batch); a job another live worker holds
    asks to be retried later.
    """
    settings = _settings(settings)
    parsed = parse_job_id(job_id)
    if parsed is None:
        return RunOutcome(str(job_id), "missing", error=f"{job_id!r} is not a job id")
    params = {"id": parsed, "kind": JOB_KIND, "worker": worker, "lease": lease_seconds(settings)}
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        known = conn.execute(
            text("SELECT status, result, error FROM jobs WHERE id = :id AND status IN ('succeeded', 'failed', "
                 "'cancelled')"), {"id": parsed}
        ).one_or_none()
    if known is not None:
        return RunOutcome(str(parsed), known.status, result=known.result, error=known.error)
    with _quick_commit(settings) as conn:
        own = _claim(conn, _CLAIM_OWN, params)
        if not own:
            row = conn.execute(
                text("SELECT status, result, error, worker, attempts, lease_expires_at - now() AS left_ "
                     "FROM jobs WHERE id = :id"), {"id": parsed}
            ).one_or_none()
            if row is None:
                return RunOutcome(str(parsed), "missing", error="no such job")
            if row.status in FINISHED_STATUSES:
                return RunOutcome(str(parsed), row.status, result=row.result, error=row.error)
            if row.status == "running" and _owner_is_gone(row.worker, parsed, worker):
                log.warning("job %s: its worker %s is gone; taking it over", parsed, row.worker)
                own = _claim(conn, _CLAIM_FROM_DEAD, {**params, "owner": row.worker, "attempts": row.attempts})
            if not own:
                left = row.left_.total_seconds() if row.left_ is not None else 0.0
                return RunOutcome(str(parsed), row.status, retry_in=min(max(left + 0.1, 0.5), 5.0))
    _track([own[0].id], True)
    batch = own
    try:
        _drain(batch, params, settings)
        outcomes = _process(batch, worker, settings)
    finally:
        _track([c.id for c in batch], False)
    mine = outcomes.pop(own[0].id)
    mine.ran = True
    mine.others = [o.summary() for o in outcomes.values() if o.status in FINISHED_STATUSES]
    for other in outcomes.values():
        if other.retry_in is not None:
            send_job(other.job_id, settings, countdown=other.retry_in)
    return mine


def _drain(batch: list[_Claimed], params: dict, settings: Settings) -> None:
    """Claim queued jobs into `batch` until it holds batch_size, waiting at most batch_wait_ms for them to arrive.

    Appends as it goes, so the caller releases every claimed job even if a later claim fails.
    """
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(batch) < settings.batch_size:
        with _quick_commit(settings) as conn:
            got = _claim(conn, _CLAIM_QUEUED, {**params, "n": settings.batch_size - len(batch)})
        _track([c.id for c in got], True)
        batch += got
        remaining = deadline - time.monotonic()
        if len(batch) >= settings.batch_size or remaining <= 0:
            return
        time.sleep(min(POLL_SECONDS, remaining))


def _process(batch: list[_Claimed], worker: str, settings: Settings) -> dict[uuid.UUID, RunOutcome]:
    """Rank the batch in one pipeline call; if that fails, run each job alone so one bad job fails alone."""
    global _processed
    outcomes: dict[uuid.UUID, RunOutcome] = {}
    runnable: list[tuple[_Claimed, RecommendationRequest]] = []
    failures: list[tuple[_Claimed, str, bool]] = []
    for job in batch:
        if job.attempts > settings.job_max_attempts:
            reason = f"gave up after {job.attempts - 1} attempts: the worker running it was lost"
            failures.append((job, reason + (f" (last error: {job.prior_error})" if job.prior_error else ""), False))
            continue
        try:
            runnable.append((job, RecommendationRequest.from_dict(job.request)))
        except RequestError as exc:
            failures.append((job, f"invalid request: {exc}", False))
    successes: list[tuple[_Claimed, dict]] = []
    if runnable:
        try:
            results = recommend_batch([r for _, r in runnable], settings)
            successes = [(job, result) for (job, _), result in zip(runnable, results, strict=True)]
        except Exception as exc:
            if len(runnable) == 1 or _is_time_limit(exc):
                failures += [(job, _readable(exc), not isinstance(exc, RequestError)) for job, _ in runnable]
            else:
                log.warning("batch of %d failed (%s); running its jobs one by one", len(runnable), _readable(exc))
                for job, request in runnable:
                    try:
                        successes.append((job, recommend_batch([request], settings)[0]))
                    except Exception as one_exc:
                        failures.append((job, _readable(one_exc), not isinstance(one_exc, RequestError)))
    recorded = _record_successes(successes, worker, settings)
    for job, result in successes:
        if job.id in recorded:
            outcomes[job.id] = RunOutcome(str(job.id), "succeeded", result=result)
        else:
            log.warning("job %s was taken over by another worker; dropping this result", job.id)
            outcomes[job.id] = RunOutcome(str(job.id), "running")
    for job, message, retryable in failures:
        outcomes[job.id] = _record_failure(job, message, retryable, worker, settings)
    _processed += len(recorded)
    return outcomes


def _is_time_limit(exc: BaseException) -> bool:
    from celery.exceptions import SoftTimeLimitExceeded

    return isinstance(exc, SoftTimeLimitExceeded)


def _record_successes(successes: list[tuple[_Claimed, dict]], worker: str, settings: Settings) -> set[uuid.UUID]:
    """Store results and cache rows in one statement; only jobs this worker still owns are written."""
    if not successes:
        return set()
    rows = [{"id": str(job.id), "attempts": job.attempts, "result": result} for job, result in successes]
    with _quick_commit(settings) as conn:
        ids = conn.execute(
            text(
                """
                WITH done AS (
                    SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id uuid, attempts int, result jsonb)
                ), updated AS (
                    UPDATE jobs AS j
                    SET status = 'succeeded', result = done.result, error = NULL, finished_at = now(),
                        lease_expires_at = NULL, run_after = NULL, updated_at = now()
                    FROM done
                    WHERE j.id = done.id AND j.attempts = done.attempts AND j.worker = :worker
                      AND j.status = 'running'
                    RETURNING j.id, j.cache_key, done.result
                ), cached AS (
                    INSERT INTO result_cache (cache_key, result, job_id)
                    SELECT DISTINCT ON (cache_key) cache_key, result, id FROM updated WHERE cache_key IS NOT NULL
                    ON CONFLICT (cache_key) DO UPDATE
                        SET result = excluded.result, job_id = excluded.job_id, created_at = now()
                )
                SELECT id FROM updated
                """
            ),
            {"rows": _dumps(rows), "worker": worker},
        ).scalars().all()
    return set(ids)


def _record_failure(job: _Claimed, message: str, retryable: bool, worker: str, settings: Settings) -> RunOutcome:
    """Queue the job again after a backoff while attempts remain, else mark it failed with the message."""
    final = not retryable or job.attempts >= settings.job_max_attempts
    if final and retryable:
        message = f"failed after {job.attempts} attempts: {message}"
    delay = backoff_seconds(job.attempts)
    with _quick_commit(settings) as conn:
        row = conn.execute(
            text(
                """
                UPDATE jobs SET error = :error, lease_expires_at = NULL, updated_at = now(),
                       status = CASE WHEN :final THEN 'failed' ELSE 'queued' END,
                       finished_at = CASE WHEN :final THEN now() END,
                       run_after = CASE WHEN :final THEN NULL ELSE now() + make_interval(secs => :delay) END,
                       sent_at = CASE WHEN :final THEN sent_at ELSE now() + make_interval(secs => :delay) END
                WHERE id = :id AND attempts = :attempts AND worker = :worker AND status = 'running'
                RETURNING status
                """
            ),
            {"error": message, "final": final, "delay": delay, "id": job.id, "attempts": job.attempts,
             "worker": worker},
        ).one_or_none()
    if row is None:
        return RunOutcome(str(job.id), "running")
    if final:
        log.warning("job %s failed: %s", job.id, message)
        return RunOutcome(str(job.id), "failed", error=message)
    log.info("job %s attempt %d failed (%s); retrying in %.0f s", job.id, job.attempts, message, delay)
    return RunOutcome(str(job.id), "queued", error=message, retry_in=delay)


def renew_leases(worker: str, settings: Settings | None = None) -> int:
    """Extend the leases of the jobs this process is working on."""
    with _active_lock:
        ids = list(_active)
    if not ids:
        return 0
    settings = _settings(settings)
    with _quick_commit(settings) as conn:
        return conn.execute(
            text(
                """
                UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease)
                WHERE id = ANY(:ids) AND worker = :worker AND status = 'running'
                """
            ),
            {"ids": ids, "worker": worker, "lease": lease_seconds(settings)},
        ).rowcount


# ---------------------------------------------------------------- heartbeats

def record_heartbeat(worker_name: str, settings: Settings | None = None, **details) -> None:
    """Say "alive" for this worker process in the broker's Redis, expiring after three missed beats."""
    settings = _settings(settings)
    interval = heartbeat_interval(settings)
    with _active_lock:
        active = len(_active)
    payload = {"worker": worker_name, "pid": os.getpid(), "host": socket.gethostname(), "seen_at": time.time(),
               "active_jobs": active, "processed": _processed, **details}
    celery_client.redis_client(settings).set(
        HEARTBEAT_PREFIX + worker_name, json.dumps(payload, default=str), ex=math.ceil(3 * interval)
    )


def clear_heartbeat(worker_name: str, settings: Settings | None = None) -> None:
    celery_client.redis_client(_settings(settings)).delete(HEARTBEAT_PREFIX + worker_name)


def worker_status(settings: Settings | None = None) -> dict:
    """Live workers from their heartbeats: {"workers": [...], "alive": bool, "last_seen_seconds": float | None}."""
    settings = _settings(settings)
    try:
        client = celery_client.redis_client(settings)
        keys = sorted(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=500))
        values = client.mget(keys) if keys else []
    except Exception as exc:
        return {"workers": [], "alive": False, "last_seen_seconds": None, "error": f"broker unreachable: {exc}"}
    now = time.time()
    workers = []
    for value in values:
        if value is None:
            continue
        try:
            beat = json.loads(value)
        except ValueError:
            continue
        beat["last_seen_seconds"] = round(max(now - float(beat.get("seen_at", now)), 0.0), 3)
        workers.append(beat)
    last_seen = min((w["last_seen_seconds"] for w in workers), default=None)
    return {"workers": workers, "alive": bool(workers), "last_seen_seconds": last_seen}


class Heartbeat:
    """A daemon thread in each worker process: renews its job leases and records its heartbeat."""

    def __init__(self, worker_name: str, settings: Settings, **details) -> None:
        self.worker_name = worker_name
        self.settings = settings
        self.details = details
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            renew_leases(self.worker_name, self.settings)
        except Exception as exc:
            log.warning("could not renew job leases: %s", _readable(exc))
        try:
            record_heartbeat(self.worker_name, self.settings, **self.details)
        except Exception as exc:
            log.warning("could not record heartbeat: %s", _readable(exc))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(heartbeat_interval(self.settings))

    def stop(self) -> None:
        self._stop.set()
        try:
            clear_heartbeat(self.worker_name, self.settings)
        except Exception as exc:
            log.debug("could not clear heartbeat: %s", exc)


def prepare_worker(settings: Settings | None = None) -> None:
    """Load what jobs need once per worker process (the embedding model, the default ranker's LLM)."""
    from recsys.embedding import encode
    from recsys.pipeline import ranker_for
    from recsys.rankers import is_llm_ranker

    settings = _settings(settings)
    try:
        encode(["warm up"], settings)
        if is_llm_ranker(settings.ranker):
            ranker_for(settings.ranker, settings)
    except Exception as exc:
        log.error("worker could not load its models (jobs that need them will fail): %s", _readable(exc))
