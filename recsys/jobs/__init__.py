"""Durable jobs: the jobs table is the record of work; Celery messages are only hints.

- `submit`: validate, answer from the cache, or insert a queued job and send its message.
- `kinds`: the kinds of job (recommendation, discover): how each is validated, keyed and run in a batch.
- `queries`: read jobs, counts, throughput, cache figures.
- `runner`: a worker claims a job and a batch of queued ones, ranks them together, records.
- `heartbeat`: worker liveness and lease renewal.
- `sweeper`: re-send stale jobs, delete old ones.
- `retry`: the one backoff and lease policy.

The names below are the package's public surface, so callers write `jobs.submit_recommendation(...)`.
"""

from recsys.jobs.heartbeat import HEARTBEAT_PREFIX, Heartbeat, clear_heartbeat, record_heartbeat, worker_status
from recsys.jobs.queries import (
    cache_stats,
    count_jobs,
    get_job,
    job_counts,
    job_throughput,
    job_timeline,
    list_jobs,
    wait_for_job,
)
from recsys.jobs.retry import backoff_seconds, heartbeat_interval, infrastructure_countdown, lease_seconds
from recsys.jobs.runner import RunOutcome, prepare_worker, renew_leases, run_job, worker_identity
from recsys.jobs.store import parse_job_id
from recsys.jobs.submit import SubmitOutcome, cancel_job, send_job, submit_discover, submit_job, submit_recommendation
from recsys.jobs.sweeper import cleanup_jobs, requeue_stale
from recsys.platform.models import FINISHED_STATUSES, JobStatus

__all__ = [
    "FINISHED_STATUSES", "HEARTBEAT_PREFIX", "Heartbeat", "JobStatus", "RunOutcome", "SubmitOutcome",
    "backoff_seconds", "cache_stats", "cancel_job", "cleanup_jobs", "clear_heartbeat", "count_jobs", "get_job",
    "heartbeat_interval", "infrastructure_countdown", "job_counts", "job_throughput", "job_timeline", "lease_seconds",
    "list_jobs",
    "parse_job_id", "prepare_worker", "record_heartbeat", "renew_leases", "requeue_stale", "run_job", "send_job",
    "submit_discover", "submit_job", "submit_recommendation", "wait_for_job", "worker_identity", "worker_status",
]
