"""The worker side of jobs: claim a job and a batch of queued ones, rank them together, record the outcome.

A worker claims jobs in the database (UPDATE … FOR UPDATE SKIP LOCKED), so no two workers run
one job and a message whose job is already finished does nothing. A claimed job holds a lease
(`RECSYS_JOB_STALE_SECONDS` long) that the worker process renews while it works. A job left
`running` by a killed worker is claimed again when its lease has run out, or at once when its
owner is a process on this host that no longer exists; every state change after the claim
checks (worker, attempts), so a worker that lost its claim can never overwrite the new owner's result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, text

from recsys.config import Settings
from recsys.jobs.kinds import JobKind, job_kind
from recsys.jobs.retry import backoff_seconds, busy_retry_seconds, lease_seconds
from recsys.jobs.store import dumps, parse_job_id, quick_commit, readable
from recsys.jobs.submit import send_job
from recsys.platform.db import get_engine
from recsys.platform.models import FINISHED_STATUSES
from recsys.recommend.request import RequestError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.01


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
    result_json: str | None = None
    """The result as this process stored it in the jobs table (JSON text), when it recorded it."""

    def summary(self) -> Summary:
        summary = Summary(job_id=self.job_id, status=self.status, result=self.result, error=self.error)
        summary.result_json = self.result_json
        return summary


class Summary(dict):
    """A job's summary ({job_id, status, result, error}: its Celery task's result), with `result_json`, the result's
    JSON text when this process encoded it for the jobs table, so storing the summary elsewhere need not encode
    the ~6-KB result again."""

    result_json: str | None = None


@dataclass
class _Claimed:
    id: uuid.UUID
    request: dict
    cache_key: str | None
    attempts: int
    prior_error: str | None = None


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


_JOB_STATE = text("SELECT kind, status, result, error FROM jobs WHERE id = :id")


def run_job(job_id, settings: Settings, *, worker: str) -> RunOutcome:
    """Handle one job's message: claim it, drain more queued jobs into a batch, rank them together, record.

    Finished jobs are left alone (checked first with one cheap read: most messages of a busy
    worker find their job already ranked in an earlier batch); a job another live worker holds
    asks to be retried later, and this process ranks a batch of queued jobs meanwhile.
    """
    parsed = parse_job_id(job_id)
    if parsed is None:
        return RunOutcome(str(job_id), "missing", error=f"{job_id!r} is not a job id")
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        known = conn.execute(_JOB_STATE, {"id": parsed}).one_or_none()
    if known is None:
        return RunOutcome(str(parsed), "missing", error="no such job")
    if known.status in FINISHED_STATUSES:
        return RunOutcome(str(parsed), known.status, result=known.result, error=known.error)
    kind = job_kind(known.kind)
    params = {"id": parsed, "kind": kind.name, "worker": worker, "lease": lease_seconds(settings)}
    busy: RunOutcome | None = None
    with quick_commit(settings) as conn:
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
                busy = RunOutcome(str(parsed), row.status, retry_in=busy_retry_seconds(left))
    if not own:
        busy.others = _run_queued(params, kind, worker, settings)
        if busy.others:
            return _finished_meanwhile(parsed, settings, busy)
        return busy
    outcomes = _rank(own, params, kind, worker, settings)
    mine = outcomes.pop(own[0].id)
    mine.ran = True
    mine.others = _settle_others(outcomes.values(), settings)
    return mine


def _finished_meanwhile(job_id: uuid.UUID, settings: Settings, busy: RunOutcome) -> RunOutcome:
    """`busy`, unless the worker that held the job finished it while this process ranked a batch: then its
    final outcome, so the message is done instead of retried (a Celery retry is a new message, sent and
    later received and acknowledged again; with several worker processes nearly every batch ended in one).
    """
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(_JOB_STATE, {"id": job_id}).one_or_none()
    if row is None or row.status not in FINISHED_STATUSES:
        return busy
    return RunOutcome(str(job_id), row.status, result=row.result, error=row.error, others=busy.others)


def _run_queued(params: dict, kind: JobKind, worker: str, settings: Settings) -> list[dict]:
    """While another live worker holds this message's job, rank a batch of the queued ones instead.

    Messages reach processes in queue order while each process claims the oldest queued jobs, so with
    several processes most messages find their job in another's running batch. Only asking to be retried
    left this process idle, so the processes took turns (2 processes ranked 1.02x as many jobs as one);
    claiming the next batch keeps every process ranking. Nothing queued: nothing to do, no waiting.
    Returns the finished jobs' summaries, as `RunOutcome.others`.
    """
    with quick_commit(settings) as conn:
        batch = _claim(conn, _CLAIM_QUEUED, {**params, "n": kind.batch_size(settings)})
    if not batch:
        return []
    return _settle_others(_rank(batch, params, kind, worker, settings).values(), settings)


def _rank(batch: list[_Claimed], params: dict, kind: JobKind, worker: str, settings: Settings):
    """Fill the claimed batch from the queue, rank it and record each job's outcome (by job id)."""
    _track([c.id for c in batch], True)
    try:
        _drain(batch, params, kind.batch_size(settings), settings)
        return _process(batch, kind, worker, settings)
    finally:
        _track([c.id for c in batch], False)


_warming = threading.Lock()


def _warm_next(kind: JobKind, worker: str, settings: Settings) -> None:
    """In a thread, do the `warm` step of the next batch_size queued jobs of this kind (a recommendation's
    histories, query vectors and candidates: `pipeline.prepare_ahead`), started once a full batch is ranked.

    The process then records its batch, stores the answers in the result backend, takes the answered jobs'
    messages off the queue, waits for its next message and claims: mostly Python and waiting on the broker,
    while the next batch's encoding and statements run alongside. Started after recording and only encoding
    queries, one worker process ranked 153.8 jobs/s (median of three alternating 1,000-job runs) instead of
    134.2. Preparing stages 1-2 whole, from before recording, a batch's part from its claim to its recording
    fell from ~70 ms to ~55 of a ~90-100 ms cycle (32 jobs; the rest is recording, the broker and the next
    message). Only while no other worker has ranked jobs for `WARM_ALONE_SECONDS`: it may claim the next
    batch first, and the CPU spent warming it here is lost (two worker processes on two cores, warming
    whenever the other was between batches: 4-11% slower). One warm-up at a time per process.
    """
    if kind.warm is None or not _warming.acquire(blocking=False):
        return
    try:
        thread = threading.Thread(target=_warm, args=(kind, worker, settings), name="recsys-warm", daemon=True)
        thread.start()
    except BaseException:
        _warming.release()
        raise


# The next batch's requests, unless another worker ranked jobs lately: the next batch is then as likely its as ours.
# Two NOT EXISTS, each answered from an index (the running jobs; those finished in the last seconds): one over
# `status = 'running' OR finished_at > …` read the whole table, every finished job ever kept, once per batch
# (108 ms per batch with a million finished jobs kept, 0.65 ms now; tests/test_jobs.py holds the plan to it).
WARM_ALONE_SECONDS = 10
_UPCOMING = text(
    f"""
    SELECT request FROM jobs
    WHERE status = 'queued' AND kind = :kind AND (run_after IS NULL OR run_after <= now())
      AND NOT EXISTS (SELECT FROM jobs WHERE status = 'running' AND worker <> :me)
      AND NOT EXISTS (
          SELECT FROM jobs WHERE finished_at > now() - interval '{WARM_ALONE_SECONDS} seconds' AND worker <> :me)
    ORDER BY created_at LIMIT :n
    """
)


def _warm(kind: JobKind, worker: str, settings: Settings) -> None:
    try:
        with get_engine(settings).connect() as conn:
            upcoming = conn.execute(
                _UPCOMING, {"kind": kind.name, "n": kind.batch_size(settings), "me": worker}
            ).scalars().all()
        requests = []
        for request in upcoming:
            try:
                requests.append(kind.parse(request))
            except RequestError:
                continue  # its batch reports it
        if requests:
            kind.warm(requests, settings)
    except Exception as exc:  # only a head start: the batch does the work itself
        log.debug("warming the next jobs failed: %s", readable(exc))
    finally:
        _warming.release()


def _settle_others(outcomes, settings: Settings) -> list[dict]:
    """Re-send the batch's jobs that wait for a retry; the finished ones' summaries, for the Celery backend."""
    for outcome in outcomes:
        if outcome.retry_in is not None:
            send_job(outcome.job_id, settings, countdown=outcome.retry_in)
    return [o.summary() for o in outcomes if o.status in FINISHED_STATUSES]


def _drain(batch: list[_Claimed], params: dict, size: int, settings: Settings) -> None:
    """Claim queued jobs into `batch` until it holds `size`, waiting at most batch_wait_ms for them to arrive.

    Appends as it goes, so the caller releases every claimed job even if a later claim fails.
    """
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(batch) < size:
        with quick_commit(settings) as conn:
            got = _claim(conn, _CLAIM_QUEUED, {**params, "n": size - len(batch)})
        _track([c.id for c in got], True)
        batch += got
        remaining = deadline - time.monotonic()
        if len(batch) >= size or remaining <= 0:
            return
        time.sleep(min(POLL_SECONDS, remaining))


def _process(batch: list[_Claimed], kind: JobKind, worker: str, settings: Settings) -> dict[uuid.UUID, RunOutcome]:
    """Run the batch (one kind) in one pipeline call; if that fails, run each job alone so one bad job fails alone."""
    global _processed
    outcomes: dict[uuid.UUID, RunOutcome] = {}
    runnable: list[tuple[_Claimed, object]] = []
    failures: list[tuple[_Claimed, str, bool]] = []
    for job in batch:
        if job.attempts > settings.job_max_attempts:
            reason = f"gave up after {job.attempts - 1} attempts: the worker running it was lost"
            failures.append((job, reason + (f" (last error: {job.prior_error})" if job.prior_error else ""), False))
            continue
        try:
            runnable.append((job, kind.parse(job.request)))
        except RequestError as exc:
            failures.append((job, f"invalid request: {exc}", False))
    successes: list[tuple[_Claimed, dict]] = []
    if runnable:
        try:
            results = kind.run_batch([r for _, r in runnable], settings)
            successes = [(job, result) for (job, _), result in zip(runnable, results, strict=True)]
        except Exception as exc:
            if len(runnable) == 1 or _is_time_limit(exc):
                failures += [(job, readable(exc), not isinstance(exc, RequestError)) for job, _ in runnable]
            else:
                log.warning("batch of %d failed (%s); running its jobs one by one", len(runnable), readable(exc))
                for job, request in runnable:
                    try:
                        successes.append((job, kind.run_batch([request], settings)[0]))
                    except Exception as one_exc:
                        failures.append((job, readable(one_exc), not isinstance(one_exc, RequestError)))
    if len(batch) >= kind.batch_size(settings) > 1:  # a full batch: more are likely queued
        _warm_next(kind, worker, settings)
    recorded, texts = _record_successes(successes, worker, settings)
    for job, result in successes:
        if job.id in recorded:
            outcomes[job.id] = RunOutcome(str(job.id), "succeeded", result=result, result_json=texts[job.id])
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


def _record_successes(
    successes: list[tuple[_Claimed, dict]], worker: str, settings: Settings
) -> tuple[set[uuid.UUID], dict[uuid.UUID, str]]:
    """Store results and cache rows in one statement; only jobs this worker still owns are written.

    Returns the ids written and each result's JSON text (encoded once: the result backend stores it too)."""
    if not successes:
        return set(), {}
    texts = {job.id: dumps(result) for job, result in successes}
    rows = "[" + ",".join(f'{{"id": "{job.id}", "attempts": {job.attempts}, "result": {texts[job.id]}}}'
                          for job, _ in successes) + "]"
    with quick_commit(settings) as conn:
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
            {"rows": rows, "worker": worker},
        ).scalars().all()
    stored = set(ids)
    for job, result in successes:
        if job.id in stored:  # one line per job: the worker's terminal shows progress, not result dictionaries
            timings = result.get("timings_ms") or {}
            log.info("job %s succeeded: %s, %d items in %.0f ms (batch of %s)", job.id, result.get("ranker", "-"),
                     len(result.get("items") or []), timings.get("total_ms", 0.0), result.get("batch_size", 1))
    return stored, texts


def _record_failure(job: _Claimed, message: str, retryable: bool, worker: str, settings: Settings) -> RunOutcome:
    """Queue the job again after a backoff while attempts remain, else mark it failed with the message."""
    final = not retryable or job.attempts >= settings.job_max_attempts
    if final and retryable:
        message = f"failed after {job.attempts} attempts: {message}"
    delay = backoff_seconds(job.attempts)
    with quick_commit(settings) as conn:
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


def renew_leases(worker: str, settings: Settings) -> int:
    """Extend the leases of the jobs this process is working on."""
    with _active_lock:
        ids = list(_active)
    if not ids:
        return 0
    with quick_commit(settings) as conn:
        return conn.execute(
            text(
                """
                UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease)
                WHERE id = ANY(:ids) AND worker = :worker AND status = 'running'
                """
            ),
            {"ids": ids, "worker": worker, "lease": lease_seconds(settings)},
        ).rowcount




def active_jobs() -> int:
    """How many jobs this process holds right now (for its heartbeat)."""
    with _active_lock:
        return len(_active)


def processed_jobs() -> int:
    """How many jobs this process has finished since it started."""
    return _processed


def prepare_worker(settings: Settings) -> None:
    """Load what jobs need once per worker process: the embedding model, the default ranker's LLM, the
    best sellers every batch reads (one aggregate over all purchases, ~1 s on the bundled data, which the
    first batch would otherwise pay) and every product's co-purchase partners (one statement, ~0.5 s);
    then run a batch's first stages once (`pipeline.warm_up`)."""
    from recsys.catalog.embedding import encode
    from recsys.rankers import is_llm_ranker
    from recsys.recommend.candidates import best_sellers, read_all_copurchase_neighbours
    from recsys.recommend.pipeline import ranker_for, warm_up

    try:
        encode(["warm up"], settings)
        if is_llm_ranker(settings.ranker):
            ranker_for(settings.ranker, settings)
    except Exception as exc:
        log.error("worker could not load its models (jobs that need them will fail): %s", readable(exc))
    try:
        best_sellers(settings)
        read_all_copurchase_neighbours(settings)
        warm_up(settings)
    except Exception as exc:  # an empty or unmigrated database: the first batch reads them, or says what is wrong
        log.warning("worker could not prepare its first batch's statistics and statements ahead of its first job: "
                    "%s", readable(exc))
