"""The Celery app of the recsys worker: configured from the one settings object.

Broker and result backend are `settings.celery_broker_url` (the embedded Valkey or any
redis:// URL). Messages are JSON only. Tasks are acknowledged after they finish
(`task_acks_late`) and put back when the process running them dies
(`task_reject_on_worker_lost`); each process takes one message at a time. The jobs table,
not the broker, is the record of work: see `recsys.jobs`.

Models are loaded once per worker process after the fork (`worker_process_init`), never
in the parent and never per job. Start it with `recsys worker`.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

from celery import Celery, signals
from kombu import Queue

from recsys import jobs
from recsys.config import get_settings
from recsys.platform import logs
from recsys.platform.broker import (
    DEFAULT_QUEUE,
    DISCOVER_TASK,
    RERANK_QUEUE,
    RERANK_TASK,
    SUBMIT_TASK,
    SWEEP_TASK,
    client_config,
)
from recsys.platform.process import freeze_loaded_objects

log = logging.getLogger(__name__)

# transformers logs advice on every generate() call at WARNING; the worker's terminal keeps one line per job.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HARD_LIMIT_MARGIN = 60
# Redis redelivers an unacknowledged message after this long; it must exceed the hard time
# limit and the longest retry countdown. A worker killed mid-job is recovered sooner: a prefork
# parent requeues the message at once, and the sweeper re-sends jobs whose lease ran out.
MIN_VISIBILITY_TIMEOUT = 3600


def sweep_interval(settings) -> float:
    """The beat sweeper runs twice per stale period (at least every second)."""
    return max(settings.job_stale_seconds / 2, 1.0)


settings = get_settings()
soft_time_limit = max(settings.job_time_limit, 1)
hard_time_limit = soft_time_limit + HARD_LIMIT_MARGIN
app = Celery("recsys", include=["worker.tasks"])
app.conf.update(client_config(settings.celery_broker_url))
app.conf.update(
    result_backend=settings.celery_broker_url,
    task_acks_late=True,
    task_store_errors_even_if_ignored=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_proc_alive_timeout=30,
    task_soft_time_limit=soft_time_limit,
    task_time_limit=hard_time_limit,
    task_queues=(Queue(RERANK_QUEUE), Queue(DEFAULT_QUEUE)),
    task_routes={RERANK_TASK: {"queue": RERANK_QUEUE}, SUBMIT_TASK: {"queue": DEFAULT_QUEUE},
                 DISCOVER_TASK: {"queue": DEFAULT_QUEUE}, SWEEP_TASK: {"queue": DEFAULT_QUEUE}},
    broker_transport_options={
        **app.conf.broker_transport_options,
        "visibility_timeout": max(MIN_VISIBILITY_TIMEOUT, 2 * hard_time_limit),
    },
    result_expires=24 * 3600,
    worker_max_memory_per_child=None,
    worker_log_color=False,
    beat_schedule={
        "recsys-sweep": {
            "task": SWEEP_TASK,
            "schedule": sweep_interval(settings),
            "options": {"queue": DEFAULT_QUEUE, "expires": sweep_interval(settings)},
        }
    },
)

_heartbeat: jobs.Heartbeat | None = None


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger=None, **_kwargs) -> None:
    """RECSYS_LOG_FORMAT=json: Celery's own handlers write one JSON object a line. One line per job."""
    if logger is not None:
        logs.use_format(logger.handlers, settings)
    # Celery's own "received" and "succeeded in …: <the whole result>" lines; recsys.jobs logs one line per job.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformers\.")


@signals.worker_process_init.connect
def _start_process(sender=None, **_kwargs) -> None:
    """In each process that runs tasks (after the fork): heartbeat and lease renewal, and the models.

    The models load in a thread: the pool kills a child that does not report for duty within
    `worker_proc_alive_timeout`, and a first task simply waits on the loaders' locks.
    """
    global _heartbeat
    if "OMP_NUM_THREADS" not in os.environ:
        _one_torch_thread()
    _heartbeat = jobs.Heartbeat(jobs.worker_identity(), settings, nodename=str(sender), ranker=settings.ranker,
                                ready=False)
    _heartbeat.start()
    threading.Thread(target=_load_models, args=(_heartbeat,), name="recsys-load-models", daemon=True).start()


def _one_torch_thread() -> None:
    """One intra-op thread per worker process unless OMP_NUM_THREADS says otherwise.

    A process ranks one batch at a time and scales out by --concurrency; on 2 shared cores,
    two OpenMP threads per process made query embedding 10x and Gemma 6x slower (spin-waiting).
    """
    import torch

    torch.set_num_threads(1)


def _load_models(heartbeat: jobs.Heartbeat) -> None:
    jobs.prepare_worker(settings)
    freeze_loaded_objects()
    heartbeat.details["ready"] = True
    heartbeat.beat()


@signals.worker_process_shutdown.connect
def _stop_process(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@signals.worker_shutdown.connect
def _stop_solo(**_kwargs) -> None:
    """The solo pool runs tasks in the main process, which gets no worker_process_shutdown."""
    if _heartbeat is not None:
        _heartbeat.stop()

