"""Thin tasks: parse the arguments, call recsys.jobs, format the answer.

`recsys.rerank(job_id)` runs a job that already has a row (its Celery task id is the job id,
so `AsyncResult(job_id)` gives the job's final summary). `recsys.submit(request, idempotency_key)`
does `submit_recommendation` inside the worker, for clients without database access, and
`recsys.discover(request, idempotency_key)` the same for a discover request.
`recsys.sweep()` is the periodic sweeper. When to retry is decided by `recsys.jobs.retry`.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from celery import states

from recsys import jobs
from recsys.jobs.retry import MAX_INFRASTRUCTURE_RETRIES
from recsys.platform.broker import DISCOVER_TASK, RERANK_TASK, SUBMIT_TASK, SWEEP_TASK, withdraw_reranks
from recsys.recommend.request import RequestError
from worker.app import app, settings


@app.task(name=RERANK_TASK, bind=True, max_retries=None, ignore_result=True)
def rerank(self, job_id: str) -> dict | None:
    """Results are stored explicitly (errors and retries still are, by `task_store_errors_even_if_ignored`),
    so a message whose job a batch already answered is acknowledged without writing anything."""
    if _answered_by_a_batch(self, job_id):
        return None
    try:
        outcome = jobs.run_job(job_id, settings, worker=jobs.worker_identity())
    except Exception as exc:
        if self.request.retries >= MAX_INFRASTRUCTURE_RETRIES:
            raise
        raise self.retry(exc=exc, countdown=jobs.infrastructure_countdown(self.request.retries)) from exc
    _store_answers(self.backend, outcome.others)
    withdraw_reranks([answer["job_id"] for answer in outcome.others], settings)  # their answers are stored first
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)
    summary = outcome.summary()
    if outcome.status in jobs.FINISHED_STATUSES:
        self.backend.store_result(str(job_id), summary, states.SUCCESS)
    return summary


def _answered_by_a_batch(task, job_id: str) -> bool:
    """True when another message's batch already finished this job and stored its answer in the backend.

    A busy worker finishes most jobs inside the batch of an earlier message, which takes their own messages
    off the queue; one a consumer took first (or that waited further back) then only needs acknowledging: a
    memory lookup when this process ran the batch, else one backend read, instead of a database read and a
    second write.
    """
    if str(job_id) in _answered_here:
        return True
    try:
        return task.backend.get_task_meta(str(job_id)).get("status") == states.SUCCESS
    except Exception:
        return False


# Jobs this process finished in batches and stored in the backend, newest last (their messages follow soon).
_answered_here: OrderedDict[str, None] = OrderedDict()
ANSWERED_REMEMBERED = 4096


def _store_answers(backend, answers: list[dict]) -> None:
    """Store each finished job's summary as its task's result: with Redis in one round trip for the batch
    (two per job through `store_result`), then remember them for `_answered_by_a_batch`."""
    if not answers:
        return
    client = getattr(backend, "client", None)
    if client is None or not hasattr(backend, "_get_result_meta"):
        for answer in answers:
            backend.store_result(answer["job_id"], answer, states.SUCCESS)
    else:
        encoded_meta = _meta_encoder(backend)
        with client.pipeline() as pipe:
            for answer in answers:
                key, value = backend.get_key_for_task(answer["job_id"]), encoded_meta(answer)
                if backend.expires:
                    pipe.setex(key, backend.expires, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)
            pipe.execute()
    for answer in answers:
        _answered_here[answer["job_id"]] = None
    while len(_answered_here) > ANSWERED_REMEMBERED:
        _answered_here.popitem(last=False)


_RESULT_MARK, _TASK_ID_MARK = "recsys-answer-result-mark", "recsys-answer-task-id-mark"


def _meta_encoder(backend):
    """answer → the backend's encoded SUCCESS meta for it, as `store_result` would store it.

    Celery's meta is made and encoded once for the batch (its date_done is the batch's), with marks where each
    answer's summary and task id go. A summary whose result this process encoded for the jobs table
    (`Summary.result_json`) is spliced in as JSON text around it: encoding each 6-KB result again was half of
    the ~110 µs each answer cost here. Others (and any backend that does not write JSON) are encoded whole.
    """
    meta = backend._get_result_meta(result=_RESULT_MARK, state=states.SUCCESS, traceback=None, request=None)
    meta["task_id"] = _TASK_ID_MARK
    template = backend.encode(meta)
    result_mark, task_id_mark = json.dumps(_RESULT_MARK), json.dumps(_TASK_ID_MARK)
    splice = (backend.serializer == "json" and isinstance(template, str)
              and template.count(result_mark) == 1 and template.count(task_id_mark) == 1)

    def encoded(answer: dict):
        text = getattr(answer, "result_json", None)
        if not splice or text is None:
            whole = dict(meta, result=answer, task_id=answer["job_id"])
            return backend.encode(whole)
        summary = (f'{{"job_id": {json.dumps(answer["job_id"])}, "status": {json.dumps(answer["status"])}, '
                   f'"result": {text}, "error": {json.dumps(answer["error"])}}}')
        # the task id first: the template holds one of each mark, a result may hold any text
        return template.replace(task_id_mark, json.dumps(answer["job_id"]), 1).replace(result_mark, summary, 1)

    return encoded


@app.task(name=SUBMIT_TASK)
def submit(request: dict, idempotency_key: str | None = None) -> dict:
    try:
        outcome = jobs.submit_recommendation(request, settings, idempotency_key=idempotency_key)
    except RequestError as exc:
        return {"job_id": None, "status": "rejected", "error": str(exc), "result": None, "cached": False,
                "created": False}
    return outcome.as_dict()


@app.task(name=DISCOVER_TASK)
def discover(request: dict, idempotency_key: str | None = None) -> dict:
    """`recsys.submit` for a discover request ({need, customer_id?, exclude_purchased?})."""
    try:
        outcome = jobs.submit_discover(request, settings, idempotency_key=idempotency_key)
    except RequestError as exc:
        return {"job_id": None, "status": "rejected", "error": str(exc), "result": None, "cached": False,
                "created": False}
    return outcome.as_dict()


@app.task(name=SWEEP_TASK)
def sweep() -> int:
    return jobs.requeue_stale(settings)
