"""`recsys submit`, `recsys jobs …` and `recsys worker`: durable jobs from the command line.

`recsys worker` execs `celery -A worker.app worker`, so the core never imports the worker package.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

import click

from recsys.cli.common import SERVICE_FAILURE, emit, ensure_database, fail, json_option
from recsys.config import Settings
from recsys.rankers import RANKER_NAMES

DEFAULT_QUEUES = "rerank,celery"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """Seconds from '90', '45s', '30m', '12h', '7d' or '2w'; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value or "")
    if not match:
        raise ValueError(f"cannot read duration {value!r}; use e.g. 90, 45s, 30m, 12h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _celery_command() -> list[str]:
    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or shutil.which("celery")
    return [celery] if celery else [sys.executable, "-m", "celery"]


def worker_argv(
    settings: Settings,
    *,
    concurrency: int = 1,
    pool: str = "prefork",
    queues: str = DEFAULT_QUEUES,
    beat: bool = True,
    name: str | None = None,
    loglevel: str | None = None,
) -> list[str]:
    """The `celery worker` command line `recsys worker` and `recsys up` run."""
    argv = [
        *_celery_command(), "-A", "worker.app", "worker",
        "--loglevel", (loglevel or settings.log_level).upper(),
        "--queues", queues,
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--hostname", name or f"recsys-{os.getpid()}@%h",
    ]
    if beat:
        argv += ["--beat", "--schedule", str(settings.home / "celerybeat-schedule")]
    return argv


def beat_argv(settings: Settings, loglevel: str | None = None) -> list[str]:
    return [*_celery_command(), "-A", "worker.app", "beat", "--loglevel", (loglevel or settings.log_level).upper(),
            "--schedule", str(settings.home / "celerybeat-schedule")]


def _ensure_services() -> Settings:
    from recsys.platform.embedded import ServiceError, check_broker, start_broker

    settings = ensure_database()
    try:
        if settings.uses_embedded_broker:
            start_broker(settings)
        else:
            check_broker(settings)
    except ServiceError as exc:
        fail(str(exc), SERVICE_FAILURE)
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings


@click.command("worker")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes running jobs; use 1 per GPU (each loads the model once).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True,
              help="prefork isolates jobs in a child process (time limits, redelivery if it dies); solo runs them "
                   "in the worker process itself.")
@click.option("--queues", "-Q", default=DEFAULT_QUEUES, show_default=True, help="Queues to consume.")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Embed the beat scheduler that runs the sweeper (run it in one worker only).")
@click.option("--beat-only", is_flag=True, help="Run only the beat scheduler (the sweeper), no worker.")
@click.option("--name", "-n", default=None, help="Celery node name (default recsys-PID@HOST).")
@click.option("--loglevel", default=None, help="Log level (default RECSYS_LOG_LEVEL).")
def worker(concurrency, pool, queues, beat, beat_only, name, loglevel) -> None:
    """Run the Celery worker that ranks queued jobs (and, by default, the sweeper)."""
    settings = _ensure_services()
    argv = beat_argv(settings, loglevel) if beat_only else worker_argv(
        settings, concurrency=concurrency, pool=pool, queues=queues, beat=beat, name=name, loglevel=loglevel
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@click.command("submit")
@click.option("--customer", "customer_id", type=int, default=None, help="Customer to recommend for.")
@click.option("--query", default=None, help="What the customer is looking for; omit to use the history alone.")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many products.")
@click.option("--ranker", type=click.Choice(RANKER_NAMES), default=None, help="Ranker (default RECSYS_RANKER).")
@click.option("--explain", is_flag=True, help="Ask the LLM for a one-line reason per item.")
@click.option("--exclude-purchased", is_flag=True, help="Leave out what the customer already bought.")
@click.option("--idempotency-key", default=None, help="Submitting the same key again returns the same job.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print it.")
@click.option("--timeout", default=120.0, show_default=True, type=float, help="Seconds --wait waits.")
@json_option
def submit(customer_id, query, k, ranker, explain, exclude_purchased, idempotency_key, wait, timeout, as_json):
    """Queue a recommendation job for the worker (or answer at once from the cache)."""
    from recsys import jobs
    from recsys.recommend.request import RecommendationRequest, RequestError

    payload = {"customer_id": customer_id, "query": query, "k": k, "explain": explain,
               "exclude_purchased": exclude_purchased}
    if ranker:
        payload["ranker"] = ranker
    try:
        RecommendationRequest.from_dict(payload)
    except RequestError as exc:
        fail(str(exc))
    settings = _ensure_services()
    try:
        outcome = jobs.submit_recommendation(payload, idempotency_key=idempotency_key, settings=settings)
    except RequestError as exc:
        fail(str(exc))
    if not wait or outcome.job_id is None:
        emit(outcome.as_dict(), as_json, _render_outcome)
        return
    job = jobs.wait_for_job(outcome.job_id, settings, timeout)
    emit(job, as_json, _render_job)
    if job["status"] == "failed":
        fail(f"job {job['id']} failed: {job['error']}", SERVICE_FAILURE)
    if job["status"] not in jobs.FINISHED_STATUSES:
        fail(f"job {job['id']} is still {job['status']} after {timeout:g} s; is a worker running?", SERVICE_FAILURE)


def _render_outcome(outcome: dict) -> None:
    if outcome["cached"]:
        click.echo("cached result:")
        _render_items(outcome["result"])
        return
    state = "queued" if outcome["created"] else f"existing job ({outcome['status']})"
    click.echo(f"{outcome['job_id']} {state}")


def _render_items(result: dict | None) -> None:
    for item in (result or {}).get("items", []):
        click.echo(f"{item['rank']:3}. {item['stock_code']:10} {item['description']}")
        if item.get("explanation"):
            click.echo(f"      {item['explanation']}")


def _render_job(job: dict) -> None:
    timings = job["timings"]
    click.echo(f"{job['id']} {job['status']} (attempts {job['attempts']}, worker {job['worker'] or '-'}, "
               f"total {timings['total_ms'] if timings['total_ms'] is not None else '-'} ms)")
    if job["error"]:
        click.echo(f"error: {job['error']}")
    _render_items(job.get("result"))


@click.group("jobs")
def jobs_group() -> None:
    """Inspect and manage recommendation jobs."""


@jobs_group.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]), default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0))
@json_option
def list_command(status, limit, offset, as_json) -> None:
    """Newest jobs first."""
    from recsys import jobs

    rows = jobs.list_jobs(status=status, limit=limit, offset=offset, settings=ensure_database())

    def render(items: list[dict]) -> None:
        for job in items:
            request = job["request"]
            click.echo(f"{job['id']}  {job['status']:9}  {job['timings']['created_at'][:19]}  "
                       f"customer {request.get('customer_id')}  {request.get('query') or ''!s:30.30}  "
                       f"{request.get('ranker')}")

    emit(rows, as_json, render)


@jobs_group.command("show")
@click.argument("job_id")
@json_option
def show(job_id, as_json) -> None:
    """One job: request, status, result, error, attempts, timings."""
    from recsys import jobs

    if jobs.parse_job_id(job_id) is None:
        fail(f"{job_id!r} is not a job id")
    job = jobs.get_job(job_id, ensure_database())
    if job is None:
        fail(f"no job {job_id}")
    emit(job, as_json, _render_job)


@jobs_group.command("requeue")
@click.option("--older-than", default=None, help="Re-send queued jobs sent longer ago than this (default "
              "RECSYS_JOB_STALE_SECONDS), e.g. 0, 90s, 5m.")
@json_option
def requeue(older_than, as_json) -> None:
    """Run the sweeper once: re-send stale queued jobs and jobs whose worker was lost."""
    from recsys import jobs

    try:
        seconds = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        fail(str(exc))
    sent = jobs.requeue_stale(_ensure_services(), older_than_seconds=seconds)
    emit({"sent": sent}, as_json, lambda p: click.echo(f"re-sent {p['sent']} job(s)"))


@jobs_group.command("cancel")
@click.argument("job_id")
@json_option
def cancel(job_id, as_json) -> None:
    """Cancel a job that has not started."""
    from recsys import jobs

    if jobs.parse_job_id(job_id) is None:
        fail(f"{job_id!r} is not a job id")
    settings = ensure_database()
    if not jobs.cancel_job(job_id, settings):
        job = jobs.get_job(job_id, settings)
        fail(f"no job {job_id}" if job is None else f"job {job_id} is {job['status']}; only queued jobs can be "
             "cancelled")
    emit({"id": job_id, "status": "cancelled"}, as_json, lambda p: click.echo(f"{p['id']} cancelled"))


@jobs_group.command("cleanup")
@click.option("--older-than", required=True, help="Delete finished jobs that finished longer ago, e.g. 7d, 12h.")
@json_option
def cleanup(older_than, as_json) -> None:
    """Delete finished jobs by age."""
    from recsys import jobs

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        fail(str(exc))
    deleted = jobs.cleanup_jobs(seconds, ensure_database())
    emit({"deleted": deleted}, as_json, lambda p: click.echo(f"deleted {p['deleted']} job(s)"))


@jobs_group.command("stats")
@click.option("--window", default="1h", show_default=True, help="Throughput window, e.g. 15m, 1h.")
@json_option
def stats(window, as_json) -> None:
    """Jobs per status, throughput and latency, cache, live workers."""
    from recsys import jobs

    try:
        seconds = int(parse_duration(window))
    except ValueError as exc:
        fail(str(exc))
    if seconds <= 0:
        fail("window must be positive")
    settings = ensure_database()
    payload = {
        "counts": jobs.job_counts(settings),
        "throughput": jobs.job_throughput(settings, window_seconds=seconds),
        "cache": jobs.cache_stats(settings),
        "workers": jobs.worker_status(settings),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    def render(p: dict) -> None:
        click.echo("jobs: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()))
        t = p["throughput"]
        click.echo(f"last {t['window_seconds']} s: {t['finished']} finished, p50 {t['p50_ms']} ms, "
                   f"p95 {t['p95_ms']} ms")
        click.echo(f"cache: {p['cache']['entries']} entries, {p['cache']['hits']} hits")
        w = p["workers"]
        click.echo(f"workers: {len(w['workers'])} alive" if w["alive"] else "workers: none alive")

    emit(payload, as_json, render)


def register(cli: click.Group) -> None:
    cli.add_command(worker)
    cli.add_command(submit)
    cli.add_command(jobs_group)

