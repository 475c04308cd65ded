"""The one retry policy: how long a failed job or a failed task waits, and how long a claim lasts.

Two kinds of failure retry here. A job whose ranking failed is queued again in the database
after `backoff_seconds(attempts)` until `RECSYS_JOB_MAX_ATTEMPTS` is used up. A task that could
not reach the database or broker at all (the job was never claimed) is retried by Celery after
`infrastructure_countdown(retries)`, up to `MAX_INFRASTRUCTURE_RETRIES` times: it costs no attempt.
"""

from __future__ import annotations

from recsys.config import Settings

MAX_BACKOFF_SECONDS = 60.0
MAX_INFRASTRUCTURE_RETRIES = 100
MAX_INFRASTRUCTURE_COUNTDOWN = 30.0


def backoff_seconds(attempts: int) -> float:
    """1, 2, 4, … seconds after the 1st, 2nd, 3rd failed attempt, at most a minute."""
    return min(2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def infrastructure_countdown(retries: int) -> float:
    """1, 2, 4, … seconds between tries to reach a database or broker that is down, at most 30."""
    return min(2.0**retries, MAX_INFRASTRUCTURE_COUNTDOWN)


def lease_seconds(settings: Settings) -> float:
    """How long a claimed job stays with its worker without a renewal."""
    return float(max(settings.job_stale_seconds, 1))


def heartbeat_interval(settings: Settings) -> float:
    """How often a worker renews its leases and heartbeat: a third of the lease, between 1 and 10 s."""
    return min(max(lease_seconds(settings) / 3, 1.0), 10.0)


def busy_retry_seconds(lease_left_seconds: float) -> float:
    """When another live worker holds the job: try again just after its lease would run out (0.5–5 s)."""
    return min(max(lease_left_seconds + 0.1, 0.5), 5.0)
