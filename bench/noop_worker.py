"""The jobs benchmark's ceiling: a Celery app with one task that does nothing, configured like worker.app.

bench/jobs.py reads worker.app's configuration in its own process (importing worker.app here would
connect its signal handlers, which load the models in every pool child) and hands it over as JSON in
BENCH_NOOP_CONF: the same broker and result store, JSON messages, late acknowledgement, reject on a
lost worker, prefetch 1 and the same time limits. Only the queue differs, so nothing of recsys runs.
"""

from __future__ import annotations

import json
import os

from celery import Celery
from kombu import Queue

QUEUE = "bench_noop"
TASK = "bench.noop"

app = Celery("bench_noop")
app.conf.update(json.loads(os.environ.get("BENCH_NOOP_CONF", "{}")))
app.conf.update(task_queues=(Queue(QUEUE),), task_default_queue=QUEUE, task_routes={TASK: {"queue": QUEUE}})


@app.task(name=TASK)
def noop(number: int) -> dict:
    """As small an answer as a job id and status: the task's cost is Celery's alone."""
    return {"number": number, "status": "succeeded"}
