"""Reading jobs: one job, pages of them, counts, throughput and the result cache's figures."""

from __future__ import annotations

import time

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import text

from recsys.config import Settings
from recsys.jobs.store import JOB_COLUMNS, job_dict, job_json, parse_job_id
from recsys.platform.db import get_engine, read_once, run_bare
from recsys.platform.models import FINISHED_STATUSES, JOB_STATUSES
from recsys.recommend import cache
from recsys.recommend.request import RequestError


def get_job(job_id, settings: Settings) -> dict | None:
    """One job with its request, result, error, attempts, worker and timings; None if unknown."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return None
    row = read_once(settings, lambda conn: conn.execute(
        text(f"SELECT {JOB_COLUMNS}, result FROM jobs WHERE id = :id"), {"id": parsed}
    ).one_or_none())
    return job_dict(row) if row is not None else None


JOB_AS_TEXT = """
    SELECT id, kind, status, CAST(request AS text) AS request, cache_key, idempotency_key, attempts, error, worker,
           created_at, sent_at, started_at, finished_at, CAST(result AS text) AS result
    FROM jobs WHERE id = %(id)s
"""


def get_job_json(job_id, settings: Settings) -> str | None:
    """`get_job` as JSON text (`store.job_json`: the stored request and result are not parsed); None if unknown.

    The API's job read: one statement on the bare driver connection (`run_bare`)."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return None

    def read(cursor: psycopg.Cursor):
        row = cursor.execute(JOB_AS_TEXT, {"id": parsed}).fetchone()
        return namedtuple_row(cursor)(row) if row is not None else None

    row = run_bare(settings, read)
    return job_json(row) if row is not None else None


def check_status(status: str | None) -> None:
    """A status filter must name a real status (RequestError otherwise)."""
    if status is not None and status not in JOB_STATUSES:
        raise RequestError(f"unknown job status {status!r}; choose one of {', '.join(JOB_STATUSES)}")


def list_jobs(settings: Settings, *, status: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
    """Newest jobs first, like `get_job` but without the (large) result."""
    check_status(status)
    if not 1 <= limit <= 1000:
        raise RequestError(f"limit must be between 1 and 1000, got {limit}")
    if offset < 0:
        raise RequestError(f"offset must not be negative, got {offset}")
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                f"""
                SELECT {JOB_COLUMNS} FROM jobs
                WHERE CAST(:status AS text) IS NULL OR status = :status
                ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset
                """
            ),
            {"status": status, "limit": limit, "offset": offset},
        ).all()
    return [job_dict(row, include_result=False) for row in rows]


def count_jobs(settings: Settings, status: str | None = None) -> int:
    check_status(status)
    with get_engine(settings).connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM jobs WHERE CAST(:status AS text) IS NULL OR status = :status"),
            {"status": status},
        ).scalar_one()


def job_counts(settings: Settings) -> dict[str, int]:
    """Jobs per status, every status present (0 when none)."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) AS n FROM jobs GROUP BY status")).all()
    counts = dict.fromkeys(JOB_STATUSES, 0)
    counts.update({row.status: row.n for row in rows})
    return counts


def job_throughput(settings: Settings, window_seconds: int = 3600) -> dict:
    """Jobs finished in the last `window_seconds`: count, jobs/s, and submit→finished latency p50/p95 (ms)."""
    if window_seconds <= 0:
        raise RequestError(f"window must be positive, got {window_seconds}")
    with get_engine(settings).connect() as conn:
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


TIMELINE_SQL = text(
    """
    WITH buckets AS (
        SELECT generate_series(date_bin(make_interval(mins => :bucket), now() - make_interval(hours => :hours),
                                        TIMESTAMPTZ '2000-01-01'),
                               now(), make_interval(mins => :bucket)) AS start
    ), finished AS (
        SELECT date_bin(make_interval(mins => :bucket), finished_at, TIMESTAMPTZ '2000-01-01') AS start,
               count(*) AS finished,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p95
        FROM jobs
        WHERE status IN ('succeeded', 'failed')
          AND finished_at >= now() - make_interval(hours => :hours, mins => :bucket)
        GROUP BY 1
    ), created AS (
        SELECT date_bin(make_interval(mins => :bucket), created_at, TIMESTAMPTZ '2000-01-01') AS start,
               count(*) AS created
        FROM jobs WHERE created_at >= now() - make_interval(hours => :hours, mins => :bucket)
        GROUP BY 1
    )
    SELECT b.start, coalesce(f.finished, 0) AS finished, f.p50, f.p95, coalesce(c.created, 0) AS created
    FROM buckets b LEFT JOIN finished f USING (start) LEFT JOIN created c USING (start)
    ORDER BY b.start
    """
)


def job_timeline(settings: Settings, hours: int = 6, bucket_minutes: int = 10) -> list[dict]:
    """The last `hours` in buckets, oldest first: jobs finished per minute, submit→finished p50/p95 (ms),
    and the share of requests answered from the result cache (hits / (hits + jobs created); None when
    there were neither)."""
    if hours <= 0 or bucket_minutes <= 0:
        raise RequestError(f"hours and bucket minutes must be positive, got {hours} and {bucket_minutes}")
    with get_engine(settings).connect() as conn:
        rows = conn.execute(TIMELINE_SQL, {"hours": hours, "bucket": bucket_minutes}).all()
    if not rows:
        return []
    first = int(rows[0].start.timestamp() // 60)
    hits = cache.hits_per_minute(settings, first, int(rows[-1].start.timestamp() // 60) + bucket_minutes - 1)
    timeline = []
    for row in rows:
        start = int(row.start.timestamp() // 60)
        bucket_hits = sum(hits.get(minute, 0) for minute in range(start, start + bucket_minutes))
        lookups = bucket_hits + row.created
        timeline.append({
            "start": row.start,
            "finished": row.finished,
            "jobs_per_minute": round(row.finished / bucket_minutes, 2),
            "p50_ms": round(float(row.p50) * 1000, 1) if row.p50 is not None else None,
            "p95_ms": round(float(row.p95) * 1000, 1) if row.p95 is not None else None,
            "cache_hits": bucket_hits,
            "jobs_created": row.created,
            "cache_hit_rate": bucket_hits / lookups if lookups else None,
        })
    return timeline


def cache_stats(settings: Settings) -> dict:
    """Cache entries and hits, this process's latest hits included."""
    cache.flush_hits()
    with get_engine(settings).connect() as conn:
        return cache.stats(conn)


def wait_for_job(job_id, settings: Settings, timeout: float = 60.0, poll: float = 0.05) -> dict | None:
    """Poll until the job is finished or `timeout` passes; the job as `get_job` shows it."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id, settings)
        if job is None or job["status"] in FINISHED_STATUSES or time.monotonic() >= deadline:
            return job
        time.sleep(poll)
