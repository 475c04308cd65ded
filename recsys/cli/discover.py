"""`recsys discover`: a need in plain words → product ideas → real products, through the job system."""

from __future__ import annotations

import click

from recsys.cli.common import SERVICE_FAILURE, emit, fail, json_option


@click.command("discover")
@click.option("--customer", "customer_id", type=int, default=None, help="Customer the need is for (optional).")
@click.option("--need", required=True, help='What the customer needs, in plain words (at most 500 characters).')
@click.option("--exclude-purchased", is_flag=True, help="Leave out what the customer already bought.")
@click.option("--idempotency-key", default=None, help="Submitting the same key again returns the same job.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print it.")
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds --wait waits.")
@json_option
def discover(customer_id, need, exclude_purchased, idempotency_key, wait, timeout, as_json):
    """Queue a discover job for the worker (or answer at once from the cache)."""
    from recsys import jobs
    from recsys.cli.jobs import _ensure_services
    from recsys.discover.request import DiscoverRequest
    from recsys.recommend.request import RequestError

    payload = {"need": need, "customer_id": customer_id, "exclude_purchased": exclude_purchased}
    try:
        DiscoverRequest.from_dict(payload)
    except RequestError as exc:
        fail(str(exc))
    settings = _ensure_services()
    try:
        outcome = jobs.submit_discover(payload, settings, idempotency_key=idempotency_key)
    except RequestError as exc:
        fail(str(exc))
    if not wait or outcome.result is not None:
        emit(outcome.as_dict(), as_json, _render_outcome)
        return
    job = jobs.wait_for_job(outcome.job_id, settings, timeout)
    emit(job, as_json, _render_job)
    if job["status"] == "failed":
        fail(f"job {job['id']} failed: {job['error']}", SERVICE_FAILURE)
    if job["status"] not in jobs.FINISHED_STATUSES:
        fail(f"job {job['id']} is still {job['status']} after {timeout:g} s; is a worker running?", SERVICE_FAILURE)


def render_result(result: dict | None) -> None:
    if not result:
        return
    click.echo(result["summary"])
    for flag, on in result.get("flags", {}).items():
        if on and flag in ("fallback", "unknown_customer"):
            click.echo(f"  ({flag.replace('_', ' ')})")
    for group in result.get("groups", []):
        idea = group["idea"]
        click.echo(f"{idea['category']}: {idea['description']}")
        for item in group["items"]:
            click.echo(f"    {item['stock_code']:10} {item['description']}")
        if group["extras"]:
            click.echo(f"    (+{len(group['extras'])} more)")


def _render_outcome(outcome: dict) -> None:
    if outcome["result"] is not None:
        click.echo(f"{outcome['job_id']} {'cached' if outcome['cached'] else outcome['status']}:")
        render_result(outcome["result"])
        return
    state = "queued" if outcome["created"] else f"existing job ({outcome['status']})"
    click.echo(f"{outcome['job_id']} {state}")


def _render_job(job: dict) -> None:
    timings = job["timings"]
    click.echo(f"{job['id']} {job['status']} (attempts {job['attempts']}, "
               f"total {timings['total_ms'] if timings['total_ms'] is not None else '-'} ms)")
    if job["error"]:
        click.echo(f"error: {job['error']}")
    render_result(job.get("result"))


def register(cli: click.Group) -> None:
    cli.add_command(discover)
