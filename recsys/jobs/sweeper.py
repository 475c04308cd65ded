"""Housekeeping run by Celery beat and `recsys jobs requeue|cleanup`: re-send stale jobs, delete old ones."""

from __future__ import annotations

import logging

from sqlalchemy import text

from recsys.config import Settings
from recsys.jobs.kinds import KINDS
from recsys.jobs.submit import send_job
from recsys.platform.db import get_engine
from recsys.recommend.request import RequestError

log = logging.getLogger(__name__)


def requeue_stale(settings: Settings, older_than_seconds: float | None = None) -> int:
    """Re-send queued jobs whose message is older than the threshold and running jobs whose lease ran out.

    Threshold: `older_than_seconds`, else RECSYS_JOB_STALE_SECONDS. Jobs whose lost workers used up
    every attempt are marked failed instead. Returns how many messages were sent.
    """
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
                WHERE kind = ANY(:kinds) AND (
                      (status = 'queued' AND coalesce(sent_at, created_at) < now() - make_interval(secs => :older))
                   OR (status = 'running' AND lease_expires_at < now()))
                ORDER BY created_at
                FOR UPDATE SKIP LOCKED
                """
            ),
            {"kinds": list(KINDS), "older": older},
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


def cleanup_jobs(older_than_seconds: float, settings: Settings) -> int:
    """Delete finished (succeeded, failed, cancelled) jobs that finished more than `older_than_seconds` ago."""
    if older_than_seconds < 0:
        raise RequestError(f"age must not be negative, got {older_than_seconds}")
    with get_engine(settings).begin() as conn:
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
